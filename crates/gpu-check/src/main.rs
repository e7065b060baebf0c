fn main() {
    println!("{:?}", candle_core::utils::cuda_is_available());
}
