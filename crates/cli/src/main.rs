//! The `starflow` command-line tool.
fn main() {}
