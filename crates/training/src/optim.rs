//! Adam / AdamW with state we can checkpoint.
//!
//! candle's `AdamW` keeps its moment buffers private, so a resumed run could not continue exactly
//! where it stopped. This one exposes its state as named tensors (`m.<var>`, `v.<var>`) plus the
//! step count, which is all a bit-exact resume needs.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::config::{OptimConfig, Schedule};
use crate::error::Result;

/// What one optimiser step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepOutcome {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// False when the gradient was non-finite and the step was skipped.
    pub applied: bool,
}

/// Adam with decoupled weight decay and global-norm clipping.
#[derive(Debug)]
pub struct Adam {
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: u64,
    cfg: OptimConfig,
}

impl Adam {
    /// An optimiser over named trainable variables (never the BatchNorm buffers).
    pub fn new(vars: Vec<(String, Var)>, cfg: &OptimConfig) -> Result<Self> {
        let m = vars
            .iter()
            .map(|(_, v)| v.as_tensor().zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Adam {
            vars,
            m,
            v,
            step: 0,
            cfg: cfg.clone(),
        })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One update with learning rate `lr`. A non-finite gradient norm skips the update entirely,
    /// leaving weights and moments untouched.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<StepOutcome> {
        // The benchmark gate's self-test: one extra allocation per step.
        #[cfg(feature = "gate-probe-alloc")]
        std::hint::black_box(Vec::<u8>::with_capacity(64));
        let mut sq = 0.0f64;
        let mut gs = Vec::with_capacity(self.vars.len());
        for (_, var) in &self.vars {
            let g = match grads.get(var.as_tensor()) {
                Some(g) => g.clone(),
                None => var.as_tensor().zeros_like()?,
            };
            // Summed on the device, read on the host (Metal has no f64).
            sq += g
                .sqr()?
                .sum_all()?
                .to_device(&candle_core::Device::Cpu)?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
            gs.push(g);
        }
        let grad_norm = sq.sqrt();
        if !grad_norm.is_finite() {
            return Ok(StepOutcome {
                grad_norm,
                applied: false,
            });
        }
        let scale = if self.cfg.grad_clip > 0.0 && grad_norm > self.cfg.grad_clip {
            self.cfg.grad_clip / grad_norm
        } else {
            1.0
        };
        self.step += 1;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let c1 = 1.0 - b1.powi(self.step as i32);
        let c2 = 1.0 - b2.powi(self.step as i32);
        for (k, (_, var)) in self.vars.iter().enumerate() {
            let g = if scale != 1.0 {
                gs[k].affine(scale, 0.0)?
            } else {
                gs[k].clone()
            };
            let m = ((&self.m[k] * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&self.v[k] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let update = ((&m / c1)? / ((&v / c2)?.sqrt()? + self.cfg.eps)?)?;
            let p = var.as_tensor();
            let mut next = (p - (update * lr)?)?;
            if self.cfg.weight_decay > 0.0 {
                next = (next - (p * (lr * self.cfg.weight_decay))?)?;
            }
            var.set(&next)?;
            self.m[k] = m;
            self.v[k] = v;
        }
        Ok(StepOutcome {
            grad_norm,
            applied: true,
        })
    }

    /// The state as named tensors (`m.<name>`, `v.<name>`) for a safetensors file.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (k, (name, _)) in self.vars.iter().enumerate() {
            out.insert(format!("m.{name}"), self.m[k].clone());
            out.insert(format!("v.{name}"), self.v[k].clone());
        }
        out
    }

    /// Restores the state saved by [`Adam::state_tensors`].
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for (k, (name, var)) in self.vars.iter().enumerate() {
            for (prefix, slot) in [("m", &mut self.m[k]), ("v", &mut self.v[k])] {
                let key = format!("{prefix}.{name}");
                let t = tensors.get(&key).ok_or_else(|| {
                    candle_core::Error::Msg(format!("optimizer state lacks `{key}`"))
                })?;
                if t.dims() != var.dims() {
                    return Err(candle_core::Error::Msg(format!(
                        "optimizer state `{key}` has shape {:?}, the variable {:?}",
                        t.dims(),
                        var.dims()
                    ))
                    .into());
                }
                *slot = t.to_device(var.device())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Learning rate of `epoch` (0-based) under the configured schedule.
pub fn learning_rate(cfg: &OptimConfig, epoch: usize) -> f64 {
    if epoch < cfg.warmup_epochs {
        return cfg.lr * (epoch + 1) as f64 / (cfg.warmup_epochs + 1) as f64;
    }
    match cfg.schedule {
        Schedule::Cosine => {
            let span = cfg.epochs.saturating_sub(cfg.warmup_epochs).max(1) as f64;
            let t = (epoch - cfg.warmup_epochs) as f64 / span;
            let lo = cfg.lr * cfg.min_lr_factor;
            lo + 0.5 * (cfg.lr - lo) * (1.0 + (std::f64::consts::PI * t).cos())
        }
        Schedule::Constant => cfg.lr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Adam on f(p) = sum((p - 3)^2) converges, and matches a hand-computed first step.
    #[test]
    fn adam_first_step_and_convergence() {
        let var = Var::zeros((2,), DType::F64, &Device::Cpu).unwrap();
        let cfg = OptimConfig {
            lr: 0.1,
            ..OptimConfig::default()
        };
        let mut opt = Adam::new(vec![("p".into(), var.clone())], &cfg).unwrap();
        let loss = (var.as_tensor() - 3.0)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        opt.step(&loss.backward().unwrap(), 0.1).unwrap();
        // First Adam step moves every coordinate by lr * sign(grad) (up to eps).
        let p: Vec<f64> = var.as_tensor().to_vec1().unwrap();
        assert!((p[0] - 0.1).abs() < 1e-6, "{p:?}");
        for _ in 0..500 {
            let loss = (var.as_tensor() - 3.0)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            opt.step(&loss.backward().unwrap(), 0.1).unwrap();
        }
        let p: Vec<f64> = var.as_tensor().to_vec1().unwrap();
        assert!((p[0] - 3.0).abs() < 1e-2, "{p:?}");
    }

    #[test]
    fn cosine_schedule_ends_low() {
        let cfg = OptimConfig {
            lr: 1.0,
            schedule: crate::config::Schedule::Cosine,
            epochs: 10,
            warmup_epochs: 1,
            ..OptimConfig::default()
        };
        assert!(learning_rate(&cfg, 0) < 1.0);
        assert!((learning_rate(&cfg, 1) - 1.0).abs() < 1e-12);
        assert!(learning_rate(&cfg, 9) < 0.1);
    }
}
