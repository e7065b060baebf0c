//! The embedded font. plotters' default text backend asks the system (fontconfig) for fonts, which a
//! fresh server or CI machine may not have; with the `ab_glyph` backend every family name must be
//! registered from bytes, so DejaVu Sans (Bitstream Vera licence, `assets/DejaVuSans-LICENSE.txt`)
//! ships inside the binary.

use std::sync::Once;

use plotters::style::FontStyle;

/// The family name every chart uses.
pub const FAMILY: &str = "sans-serif";

static DEJAVU_SANS: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Registers the embedded font once per process (idempotent, cheap after the first call).
pub fn ensure_registered() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for style in [
            FontStyle::Normal,
            FontStyle::Bold,
            FontStyle::Italic,
            FontStyle::Oblique,
        ] {
            // The bytes are a valid TrueType file compiled into the binary; a failure here is a
            // build defect, caught by the tests that render every figure.
            if plotters::style::register_font(FAMILY, style, DEJAVU_SANS).is_err() {
                tracing::error!("the embedded DejaVu Sans font could not be parsed");
            }
        }
    });
}
