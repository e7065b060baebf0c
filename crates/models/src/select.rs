//! Construction by name: the one place that knows every backbone. Adding a backbone is one file
//! plus one line here.

use candle_nn::VarBuilder;

use crate::backbone::Backbone;
use crate::config::BackboneConfig;
use crate::{ModelError, Result};

/// Names accepted by [`backbone`].
pub const BACKBONE_NAMES: &[&str] = &[
    "cnn",
    "tiny_cnn",
    "tiny_cnn_deep",
    "tiny_cnn_readout",
    "tiny_cnn_pool2",
    "tiny_cnn_wide",
    "tiny_cnn_skip",
];

/// Builds the backbone called `name` (one of [`BACKBONE_NAMES`]) with parameters from `vb`.
pub fn backbone(name: &str, cfg: &BackboneConfig, vb: VarBuilder) -> Result<Box<dyn Backbone>> {
    match name {
        "cnn" => Ok(Box::new(crate::cnn::cnn_model(cfg, vb)?)),
        "tiny_cnn" => Ok(Box::new(crate::tiny_cnn::tiny_cnn(cfg, vb)?)),
        "tiny_cnn_deep" => Ok(Box::new(crate::tiny_cnn::tiny_cnn_deep(cfg, vb)?)),
        "tiny_cnn_readout" => Ok(Box::new(crate::tiny_cnn::tiny_cnn_readout(cfg, vb)?)),
        "tiny_cnn_pool2" => Ok(Box::new(crate::tiny_cnn::tiny_cnn_pool2(cfg, vb)?)),
        "tiny_cnn_wide" => Ok(Box::new(crate::tiny_cnn::tiny_cnn_wide(cfg, vb)?)),
        "tiny_cnn_skip" => Ok(Box::new(crate::tiny_cnn::tiny_cnn_skip(cfg, vb)?)),
        _ => Err(ModelError::UnknownBackbone {
            name: name.to_string(),
            valid: BACKBONE_NAMES,
        }),
    }
}
