//! The parameter store: every trainable tensor under a stable, dotted name
//! (e.g. `down.0.res.1.conv1.weight`), so checkpoints and other implementations can address it.

use std::collections::BTreeMap;
use std::rc::Rc;

use crate::{Tape, Tensor, Var};

/// Whether every value of `t` is finite (no NaN, no ±∞). Branch-free over memory order: the sum
/// of `x · 0` is 0 when every `x` is finite and NaN otherwise, which vectorises where an early
/// exit would not (a whole U-Net's weights are checked after every optimiser step).
pub fn all_finite(t: &Tensor) -> bool {
    match t.as_slice_memory_order() {
        Some(s) => s.chunks(4096).all(|c| c.iter().fold(0.0f32, |acc, &x| acc + x * 0.0) == 0.0),
        None => t.iter().all(|x| x.is_finite()),
    }
}

/// Named parameters, in insertion order (the order layers created them).
#[derive(Clone, Debug, Default)]
pub struct ParamStore {
    names: Vec<String>,
    values: Vec<Rc<Tensor>>,
    index: BTreeMap<String, usize>,
}

/// The parameters of one forward pass as [`Var`]s: leaves on a tape when training, constants
/// when sampling. Looked up by name.
#[derive(Debug)]
pub struct Bound {
    vars: Vec<Var>,
    index: BTreeMap<String, usize>,
}

impl ParamStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a parameter.
    ///
    /// # Panics
    /// If the name is already taken (two layers built with the same prefix).
    pub fn insert(&mut self, name: impl Into<String>, value: Tensor) {
        let name = name.into();
        assert!(!self.index.contains_key(&name), "parameter {name} defined twice");
        self.index.insert(name.clone(), self.names.len());
        self.names.push(name);
        self.values.push(Rc::new(value));
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// True when there are no parameters.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Total number of scalar parameters.
    pub fn num_scalars(&self) -> usize {
        self.values.iter().map(|v| v.len()).sum()
    }

    /// Names in insertion order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The value of a parameter, if it exists.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.index.get(name).map(|&i| &*self.values[i])
    }

    /// `(name, value)` pairs in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.names.iter().map(String::as_str).zip(self.values.iter().map(|v| &**v))
    }

    /// Mutable access to every value, in insertion order (for optimisers).
    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut Tensor> {
        self.values.iter_mut().map(Rc::make_mut)
    }

    /// Replaces a parameter's value.
    ///
    /// # Panics
    /// If the name is unknown or the shape differs.
    pub fn set(&mut self, name: &str, value: Tensor) {
        let i = *self.index.get(name).unwrap_or_else(|| panic!("unknown parameter {name}"));
        assert_eq!(self.values[i].shape(), value.shape(), "parameter {name}: shape changes");
        self.values[i] = Rc::new(value);
    }

    /// Every parameter as a leaf on `tape`, for a training step.
    pub fn bind(&self, tape: &Tape) -> Bound {
        Bound {
            vars: self.values.iter().map(|v| tape.var_shared(Rc::clone(v))).collect(),
            index: self.index.clone(),
        }
    }

    /// Every parameter as a constant, for inference with no tape: frozen ([`Var::frozen`]), so
    /// the ops keep what they derive from the weights (packed convolution kernels) for as long
    /// as the binding lives, and a sampling run packs each weight once, not once per step.
    pub fn bind_constant(&self) -> Bound {
        Bound {
            vars: self.values.iter().map(|v| Var::frozen(Rc::clone(v))).collect(),
            index: self.index.clone(),
        }
    }
}

impl Bound {
    /// The parameter called `name`.
    ///
    /// # Panics
    /// If there is none (a layer asked for a name the model did not create).
    pub fn get(&self, name: &str) -> &Var {
        let i = self.index.get(name).unwrap_or_else(|| panic!("no parameter named {name}"));
        &self.vars[*i]
    }

    /// This binding with the parameter `name` replaced by `var` (e.g. a leaf of a gradient
    /// check while the rest stay constants).
    ///
    /// # Panics
    /// If there is no parameter called `name`.
    pub fn with_var(mut self, name: &str, var: Var) -> Bound {
        let i = *self.index.get(name).unwrap_or_else(|| panic!("no parameter named {name}"));
        self.vars[i] = var;
        self
    }

    /// The bound parameters in store order.
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.vars.iter()
    }

    /// The gradient of every parameter in store order, zeros where the loss did not depend on it.
    pub fn grads(&self, grads: &crate::Grads) -> Vec<Tensor> {
        self.vars.iter().map(|v| grads.get_or_zeros(v)).collect()
    }

    /// The backward pass of `loss`, handing each parameter's gradient to `on_final(i, g)` (i in
    /// store order; `None` where the loss does not depend on it) as soon as it is complete
    /// ([`Var::backward_notify`]).
    ///
    /// # Panics
    /// As [`Var::backward_notify`].
    pub fn backward_notify(
        &self,
        loss: &Var,
        on_final: &mut dyn FnMut(usize, Option<&Tensor>),
    ) -> crate::Grads {
        let watch: Vec<&Var> = self.vars.iter().collect();
        loss.backward_notify(&watch, on_final)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The packings kept with a binding's weights rely on this: while a binding lives, an
    /// optimiser's writes to the store go to a copy, and the bound values stay as they were.
    #[test]
    fn writes_to_the_store_leave_a_live_binding_unchanged() {
        let mut store = ParamStore::new();
        store.insert("w", Tensor::from_elem(vec![2, 3], 1.5));
        let bound = store.bind_constant();
        let before = bound.get("w").value().as_ptr();
        for v in store.values_mut() {
            v.fill(-7.0);
        }
        assert_eq!(bound.get("w").value().as_ptr(), before, "the binding's value was not moved");
        assert!(bound.get("w").value().iter().all(|&v| v == 1.5), "nor written");
        assert!(store.get("w").is_some_and(|w| w.iter().all(|&v| v == -7.0)), "the store was");
        assert!(bound.get("w").derived(|| 0u8).is_some(), "bound frozen, so packings are kept");
    }

    #[test]
    fn all_finite_finds_a_nan_or_infinity_anywhere_in_any_layout() {
        let base = Tensor::from_shape_fn(vec![3, 5000], |i| (i[0] * 7 + i[1]) as f32 * 1e30);
        assert!(all_finite(&base), "large finite values are finite");
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [[0, 0], [1, 4095], [2, 4999]] {
                let mut t = base.clone();
                t[at] = bad;
                assert!(!all_finite(&t), "{bad} at {at:?}");
                // Transposed: the same memory in another order, still one slice.
                assert!(!all_finite(&t.clone().reversed_axes()), "transposed");
            }
        }
        // Strided over owned memory: not one slice, so the element-wise path.
        let mut t = base.clone();
        t[[1, 3]] = f32::NAN;
        let every_third = t.slice_move(ndarray::s![.., ..;3]).into_dyn();
        assert!(every_third.as_slice_memory_order().is_none());
        assert!(!all_finite(&every_third));
        assert!(all_finite(&base.slice_move(ndarray::s![.., ..;3]).into_dyn()));
    }
}
