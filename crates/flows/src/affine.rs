//! The affine layer "t" of jammy_flows (`mvn_block` with `model_offset = 1`), math §2.
//!
//! Sampling direction `x = L z + mu`; density direction `z = L^{-1} (x - mu)` with
//! `log|det dz/dx| = -sum_i log sigma_i`. Parameters per item, in order:
//!
//! * `mu` (d values), used as is;
//! * raw log-scales `r` (d values): `log sigma_i = B(r_i; 0.01, 100, ln 100)`, i.e.
//!   `sigma = 0.01 + 100 sigmoid(r - ln 100)` (math §1);
//! * full covariance only: the `d (d - 1) / 2` strictly lower entries of `L`, consumed
//!   sub-diagonal by sub-diagonal starting with the one farthest from the main diagonal
//!   (for d = 3: `(2,0)`, then `(1,0)`, `(2,1)`).
//!
//! So the flow is a multivariate normal with mean `mu` and covariance `L L^T`. The density
//! direction uses forward substitution (jammy inverts `L` explicitly; both agree to rounding).
//!
//! [`OffDiagonal::Relative`] reads the same parameters with the off-diagonal entries relative to
//! their row's scale, `L = diag(sigma) (I + M)`: `L_ij = sigma_i m_ij`. The family of densities is
//! the same (any lower-triangular `L` with a positive diagonal), but the correlations depend on `m`
//! alone, whatever the scales. With jammy's absolute entries a network must shrink every `l_ij`
//! with `sigma_i` (a prediction error `e` in `l_ij` costs `(e z_j / sigma_i)^2 / 2` nats), so as the
//! posteriors narrow the off-diagonal outputs dominate the gradient of the shared layers; with
//! CNNModel that stalled training near the prior (issue 11). Relative entries cost `(e z_j)^2 / 2`.

use candle_core::{Tensor, D};

use crate::bijector::{check_points, check_theta, Bijector};
use crate::error::{FlowError, Result};
use crate::ops::bounded_log;
use crate::special::BoundedLog;

/// Diagonal or full (lower-triangular) scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CovType {
    /// `L = diag(sigma)`: 2 d parameters.
    Diagonal,
    /// Lower-triangular `L`: 2 d + d (d - 1) / 2 parameters.
    Full,
}

/// How the off-diagonal parameters of a full-covariance layer enter `L`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OffDiagonal {
    /// `L_ij = l_ij` (jammy_flows, the reference; the golden fixtures use it).
    #[default]
    Absolute,
    /// `L_ij = sigma_i m_ij`: the same family, conditioned independently of the scales.
    Relative,
}

impl OffDiagonal {
    /// `absolute` or `relative`, as written in configs.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "absolute" => Some(Self::Absolute),
            "relative" => Some(Self::Relative),
            _ => None,
        }
    }

    /// The config name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Absolute => "absolute",
            Self::Relative => "relative",
        }
    }
}

/// Lower and upper bound of the scales `sigma` (jammy's default width bounds for "t").
pub const AFFINE_SCALE_BOUNDS: (f64, f64) = (0.01, 100.0);

/// The affine layer; see the module documentation for the parameter layout.
#[derive(Debug, Clone)]
pub struct AffineLayer {
    dim: usize,
    cov: CovType,
    off: OffDiagonal,
    scale: BoundedLog,
    /// `(row, col)` of each off-diagonal parameter, in parameter order.
    offdiag: Vec<(usize, usize)>,
}

impl AffineLayer {
    /// An affine layer over `dim` dimensions with the reference's scale bounds and parameterisation.
    pub fn new(dim: usize, cov: CovType) -> Result<Self> {
        Self::with_offdiagonal(dim, cov, OffDiagonal::Absolute)
    }

    /// [`AffineLayer::new`] with a choice of how the off-diagonal parameters enter `L`.
    pub fn with_offdiagonal(dim: usize, cov: CovType, off: OffDiagonal) -> Result<Self> {
        if dim == 0 {
            return Err(FlowError::InvalidConfig(
                "affine layer needs dim >= 1".into(),
            ));
        }
        let (lo, hi) = AFFINE_SCALE_BOUNDS;
        let mut offdiag = Vec::new();
        if cov == CovType::Full {
            for k in (1..dim).rev() {
                for j in 0..dim - k {
                    offdiag.push((k + j, j));
                }
            }
        }
        Ok(Self {
            dim,
            cov,
            off,
            scale: BoundedLog::new(lo, hi, hi.ln()),
            offdiag,
        })
    }

    /// Diagonal or full.
    pub fn cov_type(&self) -> CovType {
        self.cov
    }

    /// How the off-diagonal parameters enter `L`.
    pub fn offdiagonal(&self) -> OffDiagonal {
        self.off
    }

    /// The factor `L` (d x d, row-major) and `mu` for one item's parameters.
    fn factor(&self, theta: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let d = self.dim;
        let mu = theta[..d].to_vec();
        let mut l = vec![0.0; d * d];
        for i in 0..d {
            l[i * d + i] = self.scale.eval(theta[d + i]).0.exp();
        }
        for (p, &(r, c)) in self.offdiag.iter().enumerate() {
            l[r * d + c] = match self.off {
                OffDiagonal::Absolute => theta[2 * d + p],
                OffDiagonal::Relative => l[r * d + r] * theta[2 * d + p],
            };
        }
        (mu, l)
    }
}

impl Bijector for AffineLayer {
    fn kind(&self) -> &'static str {
        match (self.cov, self.off) {
            (CovType::Diagonal, _) => "affine-diagonal",
            (CovType::Full, OffDiagonal::Absolute) => "affine-full",
            (CovType::Full, OffDiagonal::Relative) => "affine-full-relative",
        }
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn n_params(&self) -> usize {
        2 * self.dim + self.offdiag.len()
    }

    fn to_base(&self, x: &Tensor, theta: &Tensor) -> Result<(Tensor, Tensor)> {
        let b = check_points(self, "to_base", x)?;
        check_theta(self, "to_base", theta, b)?;
        let d = self.dim;
        let (lo, hi) = AFFINE_SCALE_BOUNDS;
        let mu = theta.narrow(1, 0, d)?;
        let log_sigma = bounded_log(&theta.narrow(1, d, d)?, lo, hi, hi.ln())?;
        let inv_sigma = log_sigma.neg()?.exp()?;
        let diff = x.sub(&mu)?;
        let z = match self.cov {
            CovType::Diagonal => diff.mul(&inv_sigma)?,
            CovType::Full if self.off == OffDiagonal::Absolute => {
                // Forward substitution, column by column: z_i = (diff_i - sum_j L_ij z_j) / sigma_i.
                let mut cols: Vec<Tensor> = Vec::with_capacity(d);
                for i in 0..d {
                    let mut acc = diff.narrow(1, i, 1)?;
                    for (p, &(r, c)) in self.offdiag.iter().enumerate() {
                        if r == i {
                            let lij = theta.narrow(1, 2 * d + p, 1)?;
                            acc = acc.sub(&lij.mul(&cols[c])?)?;
                        }
                    }
                    cols.push(acc.mul(&inv_sigma.narrow(1, i, 1)?)?);
                }
                Tensor::cat(&cols, 1)?
            }
            CovType::Full => {
                // Standardise, then forward substitution with the unit triangle:
                // z_i = u_i - sum_j m_ij z_j with u = (x - mu) / sigma.
                let u = diff.mul(&inv_sigma)?;
                let mut cols: Vec<Tensor> = Vec::with_capacity(d);
                for i in 0..d {
                    let mut acc = u.narrow(1, i, 1)?;
                    for (p, &(r, c)) in self.offdiag.iter().enumerate() {
                        if r == i {
                            let mij = theta.narrow(1, 2 * d + p, 1)?;
                            acc = acc.sub(&mij.mul(&cols[c])?)?;
                        }
                    }
                    cols.push(acc);
                }
                Tensor::cat(&cols, 1)?
            }
        };
        let log_det = log_sigma.sum(D::Minus1)?.neg()?;
        Ok((z, log_det))
    }

    fn from_base_points(&self, theta: &[f64], points: &mut [f64]) -> Result<()> {
        let d = self.dim;
        let (mu, l) = self.factor(theta);
        let mut tmp = vec![0.0; d];
        for pt in points.chunks_exact_mut(d) {
            for i in 0..d {
                tmp[i] = mu[i] + (0..=i).map(|j| l[i * d + j] * pt[j]).sum::<f64>();
            }
            pt.copy_from_slice(&tmp);
        }
        Ok(())
    }

    fn affine_factor(&self, theta: &[f64]) -> Option<(Vec<f64>, Vec<f64>)> {
        Some(self.factor(theta))
    }
}
