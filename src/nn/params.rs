//! The parameter store: every trainable tensor under a stable, dotted name
//! (e.g. `down.0.res.1.conv1.weight`), so checkpoints and other implementations can address it.

use std::collections::BTreeMap;
use std::rc::Rc;

use crate::{Tape, Tensor, Var};

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

    /// Every parameter as a constant, for inference with no tape.
    pub fn bind_constant(&self) -> Bound {
        Bound {
            vars: self.values.iter().map(|v| Var::constant_shared(Rc::clone(v))).collect(),
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

    /// The gradient of every parameter in store order, zeros where the loss did not depend on it.
    pub fn grads(&self, grads: &crate::Grads) -> Vec<Tensor> {
        self.vars.iter().map(|v| grads.get_or_zeros(v)).collect()
    }
}
