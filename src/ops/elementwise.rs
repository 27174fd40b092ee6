//! Elementwise ops: same-shape binary arithmetic, scalar arithmetic, and the smooth unary
//! functions the U-Net and the losses need.

use super::par::{map, map2, map3};
use crate::Var;

fn assert_same_shape(op: &str, a: &Var, b: &Var) {
    assert_eq!(
        a.shape(),
        b.shape(),
        "{op}: shapes {:?} and {:?} differ (use broadcast_to first)",
        a.shape(),
        b.shape()
    );
}

/// A unary op `y = f(x)` whose derivative is computed from `(x, y)`; only the operands the
/// derivative needs are kept for the backward pass.
fn unary(
    x: &Var,
    f: impl Fn(f32) -> f32 + Sync + Send,
    df: impl Fn(f32, f32) -> f32 + Sync + Send + 'static,
    keep_x: bool,
    keep_y: bool,
) -> Var {
    let y = map(x.value(), f);
    if !x.requires_grad() {
        return Var::constant(y);
    }
    let xs = keep_x.then(|| x.value_rc());
    let ys = keep_y.then(|| std::rc::Rc::new(y.clone()));
    Var::record([x], y, move |g, _| {
        let dx = match (&xs, &ys) {
            (Some(x), Some(y)) => map3(g, x, y, |g, x, y| g * df(x, y)),
            (Some(x), None) => map2(g, x, |g, x| g * df(x, 0.0)),
            (None, Some(y)) => map2(g, y, |g, y| g * df(0.0, y)),
            (None, None) => map(g, |g| g * df(0.0, 0.0)),
        };
        [Some(dx)]
    })
}

impl Var {
    /// `a + b`, same shapes.
    ///
    /// # Panics
    /// If the shapes differ.
    pub fn add(&self, other: &Var) -> Var {
        assert_same_shape("add", self, other);
        let y = map2(self.value(), other.value(), |a, b| a + b);
        Var::record_owned([self, other], y, |g, needs| match needs {
            [true, true] => [Some(g.clone()), Some(g)],
            [true, false] => [Some(g), None],
            [false, true] => [None, Some(g)],
            [false, false] => [None, None],
        })
    }

    /// `a − b`, same shapes.
    ///
    /// # Panics
    /// If the shapes differ.
    pub fn sub(&self, other: &Var) -> Var {
        assert_same_shape("sub", self, other);
        let y = map2(self.value(), other.value(), |a, b| a - b);
        Var::record_owned([self, other], y, |g, needs| {
            let db = needs[1].then(|| map(&g, |g| -g));
            [needs[0].then_some(g), db]
        })
    }

    /// `a ⊙ b`, same shapes.
    ///
    /// # Panics
    /// If the shapes differ.
    pub fn mul(&self, other: &Var) -> Var {
        assert_same_shape("mul", self, other);
        let y = map2(self.value(), other.value(), |a, b| a * b);
        let (a, b) = (self.value_rc(), other.value_rc());
        Var::record([self, other], y, move |g, needs| {
            [needs[0].then(|| map2(g, &b, |g, b| g * b)), needs[1].then(|| map2(g, &a, |g, a| g * a))]
        })
    }

    /// `a / b`, same shapes.
    ///
    /// # Panics
    /// If the shapes differ.
    pub fn div(&self, other: &Var) -> Var {
        assert_same_shape("div", self, other);
        let y = map2(self.value(), other.value(), |a, b| a / b);
        let (a, b) = (self.value_rc(), other.value_rc());
        Var::record([self, other], y, move |g, needs| {
            let da = needs[0].then(|| map2(g, &b, |g, b| g / b));
            let db = needs[1].then(|| map3(g, &a, &b, |g, a, b| -g * a / (b * b)));
            [da, db]
        })
    }

    /// `−x`.
    pub fn neg(&self) -> Var {
        Var::record([self], map(self.value(), |x| -x), |g, _| [Some(map(g, |g| -g))])
    }

    /// `x + c` for a scalar `c`.
    pub fn add_scalar(&self, c: f32) -> Var {
        Var::record_owned([self], map(self.value(), |x| x + c), |g, _| [Some(g)])
    }

    /// `c · x` for a scalar `c`.
    pub fn mul_scalar(&self, c: f32) -> Var {
        Var::record([self], map(self.value(), |x| x * c), move |g, _| [Some(map(g, |g| g * c))])
    }

    /// `exp(x)`; derivative `exp(x)`.
    pub fn exp(&self) -> Var {
        unary(self, f32::exp, |_, y| y, false, true)
    }

    /// Natural `log(x)`; derivative `1/x`. Non-positive inputs give NaN/−∞ as in IEEE.
    pub fn log(&self) -> Var {
        unary(self, f32::ln, |x, _| 1.0 / x, true, false)
    }

    /// `√x`; derivative `1/(2√x)`.
    pub fn sqrt(&self) -> Var {
        unary(self, f32::sqrt, |_, y| 0.5 / y, false, true)
    }

    /// `x²`; derivative `2x`.
    pub fn square(&self) -> Var {
        unary(self, |x| x * x, |x, _| 2.0 * x, true, false)
    }

    /// `tanh(x)`; derivative `1 − tanh²(x)`.
    pub fn tanh(&self) -> Var {
        unary(self, f32::tanh, |_, y| 1.0 - y * y, false, true)
    }

    /// `σ(x) = 1/(1 + e^{−x})`; derivative `σ(1 − σ)`.
    pub fn sigmoid(&self) -> Var {
        unary(self, sigmoid, |_, y| y * (1.0 - y), false, true)
    }

    /// SiLU (swish): `x·σ(x)`; derivative `σ(x)(1 + x(1 − σ(x)))`.
    pub fn silu(&self) -> Var {
        unary(
            self,
            |x| x * sigmoid(x),
            |x, _| {
                let s = sigmoid(x);
                s * (1.0 + x * (1.0 - s))
            },
            true,
            false,
        )
    }
}

/// Logistic sigmoid, finite for every input (see [`crate::kernels::math::sigmoid`]).
pub(crate) use crate::kernels::math::sigmoid;

impl std::ops::Add for &Var {
    type Output = Var;
    fn add(self, rhs: &Var) -> Var {
        Var::add(self, rhs)
    }
}

impl std::ops::Sub for &Var {
    type Output = Var;
    fn sub(self, rhs: &Var) -> Var {
        Var::sub(self, rhs)
    }
}

impl std::ops::Mul for &Var {
    type Output = Var;
    fn mul(self, rhs: &Var) -> Var {
        Var::mul(self, rhs)
    }
}

impl std::ops::Div for &Var {
    type Output = Var;
    fn div(self, rhs: &Var) -> Var {
        Var::div(self, rhs)
    }
}

impl std::ops::Neg for &Var {
    type Output = Var;
    fn neg(self) -> Var {
        Var::neg(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{check, randn, shape_strategy, uniform};
    use crate::Tape;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

        #[test]
        fn binary_ops_backward_match_finite_differences(shape in shape_strategy(3, 4), seed in 0u64..1000) {
            let a = randn(&shape, seed);
            let b = randn(&shape, seed + 1);
            let pos = uniform(&shape, 0.5, 2.0, seed + 2);
            check(&[a.clone(), b.clone()], seed, |v| v[0].add(&v[1]));
            check(&[a.clone(), b.clone()], seed, |v| v[0].sub(&v[1]));
            check(&[a.clone(), b.clone()], seed, |v| v[0].mul(&v[1]));
            check(&[a.clone(), pos.clone()], seed, |v| v[0].div(&v[1]));
            // The same value used twice on the tape: both contributions must arrive.
            check(&[a.clone()], seed, |v| v[0].mul(&v[0]));
            check(&[pos.clone()], seed, |v| v[0].div(&v[0].add_scalar(1.0)));
        }

        #[test]
        fn unary_ops_backward_match_finite_differences(shape in shape_strategy(2, 5), seed in 0u64..1000) {
            let x = randn(&shape, seed);
            let pos = uniform(&shape, 0.5, 3.0, seed + 7);
            check(&[x.clone()], seed, |v| v[0].neg());
            check(&[x.clone()], seed, |v| v[0].add_scalar(0.7));
            check(&[x.clone()], seed, |v| v[0].mul_scalar(-1.3));
            check(&[x.clone()], seed, |v| v[0].exp());
            check(&[pos.clone()], seed, |v| v[0].log());
            check(&[pos.clone()], seed, |v| v[0].sqrt());
            check(&[x.clone()], seed, |v| v[0].square());
            check(&[x.clone()], seed, |v| v[0].tanh());
            check(&[x.clone()], seed, |v| v[0].sigmoid());
            check(&[x.clone()], seed, |v| v[0].silu());
        }
    }

    #[test]
    fn sigmoid_is_finite_and_correct_at_extremes() {
        assert_eq!(sigmoid(-200.0), 0.0);
        assert_eq!(sigmoid(200.0), 1.0);
        assert!((sigmoid(0.0) - 0.5).abs() < 1e-7);
    }

    #[test]
    fn operators_match_methods() {
        let tape = Tape::new();
        let a = tape.var(randn(&[3], 1));
        let b = tape.var(uniform(&[3], 1.0, 2.0, 2));
        assert_eq!((&a + &b).value(), a.add(&b).value());
        assert_eq!((&a - &b).value(), a.sub(&b).value());
        assert_eq!((&a * &b).value(), a.mul(&b).value());
        assert_eq!((&a / &b).value(), a.div(&b).value());
        assert_eq!((-&a).value(), a.neg().value());
    }
}
