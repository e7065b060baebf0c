//! Conformance suite run over every layer type and every flow, on random parameters.
//!
//! For each [`Bijector`]: shapes, the round trips `to_base(from_base(z)) = z` and
//! `from_base(to_base(x)) = x` to 1e-10, `log|det|` against a central-difference Jacobian, and
//! autograd gradients (with respect to theta and x) against central differences of a random
//! scalar loss. For each flow: gradients of `log_prob` against finite differences, every
//! parameter column receiving a gradient, and finiteness on extreme parameters.

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use starflow_flows::{
    flow_by_name, full_gaussian_with, AffineLayer, Bijector, CovType, GaussianizationConfig,
    GaussianizationLayer, Nonlinearity, OffDiagonal,
};

fn randn(rng: &mut ChaCha8Rng, shape: (usize, usize), std: f64) -> Tensor {
    let v: Vec<f64> = (0..shape.0 * shape.1)
        .map(|_| std * rng.sample::<f64, _>(StandardNormal))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .expect("flatten")
        .to_vec1::<f64>()
        .expect("f64")
}

fn layers(dim: usize) -> Vec<Box<dyn Bijector>> {
    let g = |nl, k| {
        let cfg = GaussianizationConfig {
            n_kernels: k,
            nonlinearity: nl,
            ..GaussianizationConfig::default()
        };
        Box::new(GaussianizationLayer::new(dim, &cfg).expect("valid config")) as Box<dyn Bijector>
    };
    vec![
        Box::new(AffineLayer::new(dim, CovType::Diagonal).expect("valid")),
        Box::new(AffineLayer::new(dim, CovType::Full).expect("valid")),
        Box::new(
            AffineLayer::with_offdiagonal(dim, CovType::Full, OffDiagonal::Relative)
                .expect("valid"),
        ),
        g(Nonlinearity::InverseNormal, 10),
        g(Nonlinearity::InverseSigmoid, 10),
        g(Nonlinearity::InverseSigmoid, 3),
    ]
}

/// `log|det|` of a d x d matrix (row-major) by Gaussian elimination with partial pivoting.
fn log_abs_det(mut a: Vec<f64>, d: usize) -> f64 {
    let mut acc = 0.0;
    for c in 0..d {
        let p = (c..d)
            .max_by(|&i, &j| a[i * d + c].abs().total_cmp(&a[j * d + c].abs()))
            .expect("non-empty");
        if p != c {
            for k in 0..d {
                a.swap(c * d + k, p * d + k);
            }
        }
        let piv = a[c * d + c];
        acc += piv.abs().ln();
        for r in c + 1..d {
            let f = a[r * d + c] / piv;
            for k in c..d {
                a[r * d + k] -= f * a[c * d + k];
            }
        }
    }
    acc
}

fn check_bijector(layer: &dyn Bijector, seed: u64) {
    let d = layer.dim();
    let b = 16;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let theta = randn(&mut rng, (b, layer.n_params()), 0.7);
    let x = randn(&mut rng, (b, d), 1.5);
    let kind = layer.kind();

    // Shapes.
    let (z, ld) = layer.to_base(&x, &theta).expect("to_base");
    assert_eq!(z.dims(), &[b, d], "{kind}");
    assert_eq!(ld.dims(), &[b], "{kind}");

    // Round trips.
    let z0 = randn(&mut rng, (b, d), 1.0);
    let x1 = layer.from_base(&z0, &theta).expect("from_base");
    let (z1, _) = layer.to_base(&x1, &theta).expect("to_base");
    for (a, c) in flat(&z1).iter().zip(flat(&z0)) {
        assert!(
            (a - c).abs() <= 1e-10 * c.abs().max(1.0),
            "{kind}: to_base(from_base(z)) {a} vs {c}"
        );
    }
    let x2 = layer.from_base(&z, &theta).expect("from_base");
    for (a, c) in flat(&x2).iter().zip(flat(&x)) {
        assert!(
            (a - c).abs() <= 1e-10 * c.abs().max(1.0),
            "{kind}: from_base(to_base(x)) {a} vs {c}"
        );
    }

    // log|det dz/dx| against a central-difference Jacobian.
    let h = 1e-6;
    let xv = flat(&x);
    let ldv = flat(&ld);
    for row in 0..b {
        let mut jac = vec![0.0; d * d];
        let th_row = theta.narrow(0, row, 1).expect("row");
        for c in 0..d {
            let shifted = |s: f64| {
                let mut p = xv[row * d..(row + 1) * d].to_vec();
                p[c] += s;
                let t = Tensor::from_vec(p, (1, d), &Device::Cpu).expect("tensor");
                flat(&layer.to_base(&t, &th_row).expect("to_base").0)
            };
            let (zp, zm) = (shifted(h), shifted(-h));
            for r in 0..d {
                jac[r * d + c] = (zp[r] - zm[r]) / (2.0 * h);
            }
        }
        let fd = log_abs_det(jac, d);
        assert!(
            (fd - ldv[row]).abs() <= 1e-6 * ldv[row].abs().max(1.0),
            "{kind} row {row}: log-det {} vs finite difference {fd}",
            ldv[row]
        );
    }

    // Autograd against central differences of a random scalar loss L = sum(w * z) + sum(u * ld).
    let w = randn(&mut rng, (b, d), 1.0);
    let u = randn(&mut rng, (b, 1), 1.0).flatten_all().expect("flat");
    let loss = |x: &Tensor, th: &Tensor| -> Tensor {
        let (z, ld) = layer.to_base(x, th).expect("to_base");
        (z.mul(&w).expect("mul").sum_all().expect("sum")
            + ld.mul(&u).expect("mul").sum_all().expect("sum"))
        .expect("add")
    };
    let tv = Var::from_tensor(&theta).expect("var");
    let xv_var = Var::from_tensor(&x).expect("var");
    let grads = loss(xv_var.as_tensor(), tv.as_tensor())
        .backward()
        .expect("backward");
    let g_theta = flat(grads.get(tv.as_tensor()).expect("gradient reaches theta"));
    let g_x = flat(grads.get(xv_var.as_tensor()).expect("gradient reaches x"));
    let l0 = |x: &Tensor, th: &Tensor| loss(x, th).to_scalar::<f64>().expect("scalar");
    let th_v = flat(&theta);
    let p = layer.n_params();
    let eps = 1e-6;
    // Every parameter of two rows, and every coordinate of x.
    for idx in (0..p).chain(5 * p..6 * p) {
        let bump = |s: f64| {
            let mut t = th_v.clone();
            t[idx] += s;
            l0(
                &x,
                &Tensor::from_vec(t, (b, p), &Device::Cpu).expect("tensor"),
            )
        };
        let fd = (bump(eps) - bump(-eps)) / (2.0 * eps);
        let g = g_theta[idx];
        assert!(
            (fd - g).abs() <= 1e-6 * g.abs().max(1.0),
            "{kind}: d/dtheta[{idx}] autograd {g} vs finite difference {fd}"
        );
    }
    for idx in 0..b * d {
        let bump = |s: f64| {
            let mut t = xv.clone();
            t[idx] += s;
            l0(
                &Tensor::from_vec(t, (b, d), &Device::Cpu).expect("tensor"),
                &theta,
            )
        };
        let fd = (bump(eps) - bump(-eps)) / (2.0 * eps);
        let g = g_x[idx];
        assert!(
            (fd - g).abs() <= 1e-6 * g.abs().max(1.0),
            "{kind}: d/dx[{idx}] autograd {g} vs finite difference {fd}"
        );
    }
}

#[test]
fn every_layer_conforms_at_d3() {
    for (i, layer) in layers(3).iter().enumerate() {
        check_bijector(layer.as_ref(), 100 + i as u64);
    }
}

#[test]
fn every_layer_conforms_at_other_dims() {
    for dim in [1, 2, 5] {
        for (i, layer) in layers(dim).iter().enumerate() {
            check_bijector(layer.as_ref(), 200 + 10 * dim as u64 + i as u64);
        }
    }
}

#[test]
fn flow_gradients_match_finite_differences_and_reach_every_parameter() {
    let mut flows: Vec<(&str, starflow_flows::Flow)> =
        ["diagonal_gaussian", "full_gaussian", "full_flow"]
            .into_iter()
            .map(|n| (n, flow_by_name(n, 3).expect("known flow")))
            .collect();
    flows.push((
        "full_gaussian (relative)",
        full_gaussian_with(3, OffDiagonal::Relative).expect("flow"),
    ));
    flows.push((
        "full_flow (relative)",
        starflow_flows::full_flow(&starflow_flows::FullFlowConfig {
            offdiagonal: OffDiagonal::Relative,
            ..Default::default()
        })
        .expect("flow"),
    ));
    for (name, flow) in flows {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let b = 32;
        let p = flow.n_params();
        let params = randn(&mut rng, (b, p), 0.5);
        let x = randn(&mut rng, (b, 3), 1.5);
        let pv = Var::from_tensor(&params).expect("var");
        let grads = flow
            .log_prob(pv.as_tensor(), &x)
            .expect("log_prob")
            .sum_all()
            .expect("sum")
            .backward()
            .expect("backward");
        let g = flat(grads.get(pv.as_tensor()).expect("gradient reaches params"));
        for col in 0..p {
            assert!(
                (0..b).any(|r| g[r * p + col] != 0.0),
                "{name}: parameter column {col} gets no gradient"
            );
        }
        let base = flat(&params);
        let lp = |v: Vec<f64>, row: usize| -> f64 {
            let t = Tensor::from_vec(v, (b, p), &Device::Cpu).expect("tensor");
            flat(&flow.log_prob(&t, &x).expect("log_prob"))[row]
        };
        let eps = 1e-6;
        let row = 3;
        for col in 0..p {
            let idx = row * p + col;
            let mut up = base.clone();
            up[idx] += eps;
            let mut dn = base.clone();
            dn[idx] -= eps;
            let fd = (lp(up, row) - lp(dn, row)) / (2.0 * eps);
            assert!(
                (fd - g[idx]).abs() <= 1e-6 * g[idx].abs().max(1.0),
                "{name}: column {col}: autograd {} vs fd {fd}",
                g[idx]
            );
        }
    }
}

/// The relative parameterisation is the same family of Gaussians: with `l_ij = sigma_i m_ij` the
/// absolute layer gives the same density at every point.
#[test]
fn relative_offdiagonal_is_the_absolute_layer_reparameterised() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (b, d) = (16, 3);
    let rel = full_gaussian_with(d, OffDiagonal::Relative).expect("flow");
    let abs = flow_by_name("full_gaussian", d).expect("flow");
    let theta = flat(&randn(&mut rng, (b, 9), 0.8));
    let x = randn(&mut rng, (b, d), 1.2);
    // Same mu and raw scales; absolute off-diagonals l = sigma_row * m, in parameter order
    // (2,0), (1,0), (2,1).
    // The scales sigma from the diagonal flow's exact moments with the same (mu, raw scales).
    let diag = flow_by_name("diagonal_gaussian", d).expect("flow");
    let head: Vec<f64> = (0..b)
        .flat_map(|i| theta[i * 9..i * 9 + 2 * d].to_vec())
        .collect();
    let moments = diag
        .gaussian_moments(&Tensor::from_vec(head, (b, 2 * d), &Device::Cpu).expect("tensor"))
        .expect("moments");
    let rows = [2usize, 1, 2];
    let mut theta_abs = theta.clone();
    for (i, m) in moments.iter().enumerate() {
        for (p, &r) in rows.iter().enumerate() {
            let sigma = m.cov[r * d + r].sqrt();
            theta_abs[i * 9 + 2 * d + p] = sigma * theta[i * 9 + 2 * d + p];
        }
    }
    let lp = |f: &starflow_flows::Flow, th: Vec<f64>| {
        let t = Tensor::from_vec(th, (b, 9), &Device::Cpu).expect("tensor");
        flat(&f.log_prob(&t, &x).expect("log_prob"))
    };
    let (a, r) = (lp(&abs, theta_abs), lp(&rel, theta));
    for k in 0..b {
        assert!(
            (a[k] - r[k]).abs() < 1e-10 * a[k].abs().max(1.0),
            "item {k}: absolute {} vs relative {}",
            a[k],
            r[k]
        );
    }
}

#[test]
fn extreme_parameters_stay_finite() {
    for name in ["diagonal_gaussian", "full_gaussian", "full_flow"] {
        let flow = flow_by_name(name, 3).expect("known flow");
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let params = randn(&mut rng, (64, flow.n_params()), 4.0);
        let x = randn(&mut rng, (64, 3), 3.0);
        let pv = Var::from_tensor(&params).expect("var");
        let xv = Var::from_tensor(&x).expect("var");
        let lp = flow
            .log_prob(pv.as_tensor(), xv.as_tensor())
            .expect("log_prob");
        assert!(
            flat(&lp).iter().all(|v| v.is_finite()),
            "{name}: non-finite log_prob"
        );
        let grads = lp.sum_all().expect("sum").backward().expect("backward");
        for t in [pv.as_tensor(), xv.as_tensor()] {
            assert!(
                flat(grads.get(t).expect("grad"))
                    .iter()
                    .all(|v| v.is_finite()),
                "{name}: non-finite gradient"
            );
        }
    }
}

#[test]
fn parameter_counts_follow_from_dim_and_config() {
    assert_eq!(
        flow_by_name("diagonal_gaussian", 3)
            .expect("flow")
            .n_params(),
        6
    );
    assert_eq!(
        flow_by_name("full_gaussian", 3).expect("flow").n_params(),
        9
    );
    assert_eq!(flow_by_name("full_flow", 3).expect("flow").n_params(), 306);
    assert_eq!(
        flow_by_name("full_gaussian", 4).expect("flow").n_params(),
        14
    );
    let cfg = starflow_flows::FullFlowConfig {
        dim: 2,
        n_gaussianization_layers: 2,
        n_kernels: 5,
        ..Default::default()
    };
    let flow = starflow_flows::full_flow(&cfg).expect("flow");
    // Two g layers of 2*2 + 3*5*2 = 34 and an affine layer of 2 + 2 + 1 = 5.
    assert_eq!(flow.n_params(), 73);
    assert_eq!(flow.param_range(1), 34..68);
    assert_eq!(flow.param_range(2), 68..73);
}

#[test]
fn unknown_names_and_bad_shapes_are_errors() {
    let err = flow_by_name("real_nvp", 3).expect_err("unknown flow");
    let msg = err.to_string();
    assert!(
        msg.contains("real_nvp") && msg.contains("diagonal_gaussian, full_gaussian, full_flow"),
        "{msg}"
    );
    let flow = flow_by_name("full_flow", 3).expect("flow");
    let params = Tensor::zeros((4, 305), DType::F64, &Device::Cpu).expect("tensor");
    let x = Tensor::zeros((4, 3), DType::F64, &Device::Cpu).expect("tensor");
    let msg = flow
        .log_prob(&params, &x)
        .expect_err("wrong width")
        .to_string();
    assert!(msg.contains("306") && msg.contains("305"), "{msg}");
    let params = Tensor::zeros((4, 306), DType::F32, &Device::Cpu).expect("tensor");
    assert!(
        flow.log_prob(&params, &x).is_err(),
        "f32 params must be rejected"
    );
    assert!(
        flow.gaussian_moments(&params).is_err(),
        "full_flow has no analytic moments"
    );
}
