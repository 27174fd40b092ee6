//! The tape, the `Var` handle and the gradient store.

use std::any::Any;
use std::cell::RefCell;
use std::fmt;
use std::rc::Rc;

use super::Tensor;

/// Every value and gradient is kept row-major and contiguous, so kernels can take slices
/// (ndarray's `concatenate`, for one, returns other layouts). A no-op for standard arrays.
fn standard_layout(t: Tensor) -> Tensor {
    if t.is_standard_layout() {
        t
    } else {
        t.as_standard_layout().into_owned()
    }
}

/// [`standard_layout`] for a shared value: the same `Rc` when it is already row-major.
fn shared_standard(value: Rc<Tensor>) -> Rc<Tensor> {
    if value.is_standard_layout() {
        value
    } else {
        Rc::new(value.as_standard_layout().into_owned())
    }
}

/// A node's backward step: given the gradient of its output, accumulate into its inputs.
type BackwardFn = Box<dyn FnOnce(Tensor, &mut Grads)>;

struct Node {
    /// `None` for leaves: they keep their gradient instead of passing it on.
    backward: Option<BackwardFn>,
    /// The first node that takes this one as an input (`usize::MAX` while none does): once the
    /// reverse sweep has run it, this node's gradient is complete.
    first_use: usize,
}

/// A Wengert list of recorded ops. Cheap to clone (a shared handle).
///
/// Make one per training step, create the parameters as leaves with [`Tape::var`], run the
/// model, call [`Var::backward`] on the scalar loss, and drop the tape.
#[derive(Clone, Default)]
pub struct Tape {
    nodes: Rc<RefCell<Vec<Node>>>,
}

impl fmt::Debug for Tape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tape({} nodes)", self.len())
    }
}

impl Tape {
    /// An empty tape.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of recorded nodes (leaves and ops).
    pub fn len(&self) -> usize {
        self.nodes.borrow().len()
    }

    /// True when nothing has been recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A leaf on this tape: a value whose gradient [`Var::backward`] will report (a parameter or
    /// an input to differentiate with respect to).
    pub fn var(&self, value: Tensor) -> Var {
        self.var_shared(Rc::new(standard_layout(value)))
    }

    /// Like [`Tape::var`], sharing an existing value instead of copying it (a value not in
    /// standard layout is copied into it, as every value on a tape is).
    pub fn var_shared(&self, value: Rc<Tensor>) -> Var {
        let value = shared_standard(value);
        let id = self.push(None);
        Var { value, node: Some((self.clone(), id)), derived: None }
    }

    fn push(&self, backward: Option<BackwardFn>) -> usize {
        let mut nodes = self.nodes.borrow_mut();
        nodes.push(Node { backward, first_use: usize::MAX });
        nodes.len() - 1
    }

    fn same(&self, other: &Tape) -> bool {
        Rc::ptr_eq(&self.nodes, &other.nodes)
    }
}

/// A value, and where it sits on a tape if it is being differentiated.
///
/// Cloning is cheap (two reference counts). A `Var` without a tape (made by [`Var::constant`] or
/// [`Var::detach`]) behaves like a plain tensor: ops on it record nothing.
#[derive(Clone)]
pub struct Var {
    value: Rc<Tensor>,
    node: Option<(Tape, usize)>,
    /// What ops derived from a frozen value and keep with it ([`Var::frozen`]); `None` for
    /// every other value.
    derived: Option<Rc<Derived>>,
}

/// The values ops derived from a frozen value, at most one of each type, shared by its clones.
#[derive(Default)]
struct Derived(RefCell<Vec<Rc<dyn Any>>>);

impl fmt::Debug for Var {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.node {
            Some((_, id)) => write!(f, "Var(node {id}, shape {:?})", self.shape()),
            None => write!(f, "Var(constant, shape {:?})", self.shape()),
        }
    }
}

impl Var {
    /// A value that is not differentiated: no tape, nothing recorded by ops that only use
    /// constants. This is the inference path.
    pub fn constant(value: Tensor) -> Var {
        Var { value: Rc::new(standard_layout(value)), node: None, derived: None }
    }

    /// Like [`Var::constant`], sharing an existing value instead of copying it (a value not in
    /// standard layout is copied into it).
    pub fn constant_shared(value: Rc<Tensor>) -> Var {
        Var { value: shared_standard(value), node: None, derived: None }
    }

    /// A constant (like [`Var::constant_shared`]) whose value cannot change for as long as it or
    /// a clone lives, so ops may keep what they derive from it with it ([`Var::derived`]: a
    /// convolution's packed weights) instead of deriving it again on every call. The value is
    /// shared, and a shared `Rc` is never written through (`Rc::make_mut` copies it, `get_mut`
    /// refuses). The parameters of an inference run are bound so
    /// ([`crate::nn::ParamStore::bind_constant`]).
    pub fn frozen(value: Rc<Tensor>) -> Var {
        Var { value: shared_standard(value), node: None, derived: Some(Rc::default()) }
    }

    /// The value of type `T` derived from this one: made by `make` on the first call and kept with
    /// the value for the later calls. `None` unless the value is [`Var::frozen`]; the caller then
    /// derives it for this call alone.
    pub fn derived<T: Any>(&self, make: impl FnOnce() -> T) -> Option<Rc<T>> {
        let mut kept = self.derived.as_ref()?.0.borrow_mut();
        if let Some(t) = kept.iter().find_map(|d| Rc::clone(d).downcast::<T>().ok()) {
            return Some(t);
        }
        let t = Rc::new(make());
        kept.push(Rc::clone(&t) as Rc<dyn Any>);
        Some(t)
    }

    /// The value.
    pub fn value(&self) -> &Tensor {
        &self.value
    }

    /// The value as a shared pointer (cheap to keep for a backward closure).
    pub fn value_rc(&self) -> Rc<Tensor> {
        Rc::clone(&self.value)
    }

    /// The shape, e.g. `[N, C, H, W]`.
    pub fn shape(&self) -> &[usize] {
        self.value.shape()
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.value.len()
    }

    /// True for a value with no elements.
    pub fn is_empty(&self) -> bool {
        self.value.is_empty()
    }

    /// The tape this value is recorded on, if any.
    pub fn tape(&self) -> Option<&Tape> {
        self.node.as_ref().map(|(t, _)| t)
    }

    /// The node index on its tape, if any.
    pub fn id(&self) -> Option<usize> {
        self.node.as_ref().map(|(_, id)| *id)
    }

    /// True when gradients flow into this value.
    pub fn requires_grad(&self) -> bool {
        self.node.is_some()
    }

    /// The same value cut off from the tape: gradients stop here.
    pub fn detach(&self) -> Var {
        Var { value: Rc::clone(&self.value), node: None, derived: self.derived.clone() }
    }

    /// Records an op with `N` inputs and returns its output.
    ///
    /// `backward(grad_out, needs)` returns one gradient per input, with the input's shape; it is
    /// only asked for the inputs whose `needs[i]` is true (it may return `None` for the others).
    /// When no input is on a tape, nothing is recorded and `backward` is dropped unused.
    ///
    /// # Panics
    /// If the inputs belong to different tapes, or a returned gradient has the wrong shape.
    pub fn record<const N: usize, F>(inputs: [&Var; N], value: Tensor, backward: F) -> Var
    where
        F: FnOnce(&Tensor, [bool; N]) -> [Option<Tensor>; N] + 'static,
    {
        Var::record_many(&inputs, value, move |g, needs| {
            let needs: [bool; N] = std::array::from_fn(|i| needs[i]);
            backward(g, needs).into()
        })
    }

    /// [`Var::record`] for a number of inputs known only at run time (e.g. concat).
    ///
    /// # Panics
    /// As [`Var::record`]; also if `backward` returns a different number of gradients.
    pub fn record_many<F>(inputs: &[&Var], value: Tensor, backward: F) -> Var
    where
        F: FnOnce(&Tensor, &[bool]) -> Vec<Option<Tensor>> + 'static,
    {
        Var::record_many_owned(inputs, value, move |g, needs| backward(&g, needs))
    }

    /// [`Var::record`] whose backward step receives the output gradient by value, so an op
    /// whose input gradient *is* the output gradient (add, reshape, …) can pass it on without
    /// a copy.
    pub fn record_owned<const N: usize, F>(inputs: [&Var; N], value: Tensor, backward: F) -> Var
    where
        F: FnOnce(Tensor, [bool; N]) -> [Option<Tensor>; N] + 'static,
    {
        Var::record_many_owned(&inputs, value, move |g, needs| {
            let needs: [bool; N] = std::array::from_fn(|i| needs[i]);
            backward(g, needs).into()
        })
    }

    /// [`Var::record`] whose backward step also sees the op's output (softmax, …), shared with
    /// the returned `Var` rather than copied.
    pub fn record_with_output<const N: usize, F>(inputs: [&Var; N], value: Tensor, backward: F) -> Var
    where
        F: FnOnce(&Tensor, &Tensor, [bool; N]) -> [Option<Tensor>; N] + 'static,
    {
        let value = Rc::new(standard_layout(value));
        let y = Rc::clone(&value);
        Var::record_shared(&inputs, value, move |g, needs| {
            let needs: [bool; N] = std::array::from_fn(|i| needs[i]);
            backward(&g, &y, needs).into()
        })
    }

    /// [`Var::record_many`] with the output gradient passed by value (see [`Var::record_owned`]).
    pub fn record_many_owned<F>(inputs: &[&Var], value: Tensor, backward: F) -> Var
    where
        F: FnOnce(Tensor, &[bool]) -> Vec<Option<Tensor>> + 'static,
    {
        Var::record_shared(inputs, Rc::new(standard_layout(value)), backward)
    }

    /// Records an op whose output value (standard layout) is already shared.
    fn record_shared<F>(inputs: &[&Var], value: Rc<Tensor>, backward: F) -> Var
    where
        F: FnOnce(Tensor, &[bool]) -> Vec<Option<Tensor>> + 'static,
    {
        let mut tape: Option<Tape> = None;
        for v in inputs.iter() {
            if let Some((t, _)) = &v.node {
                match &tape {
                    None => tape = Some(t.clone()),
                    Some(t0) => assert!(t0.same(t), "op mixes values from two different tapes"),
                }
            }
        }
        let Some(tape) = tape else {
            return Var::constant_shared(value);
        };
        let ids: Vec<Option<usize>> = inputs.iter().map(|v| v.id()).collect();
        let shapes: Vec<Vec<usize>> = inputs.iter().map(|v| v.shape().to_vec()).collect();
        let closure: BackwardFn = Box::new(move |grad_out: Tensor, grads: &mut Grads| {
            let needs: Vec<bool> = ids.iter().map(Option::is_some).collect();
            let input_grads = backward(grad_out, &needs);
            assert_eq!(input_grads.len(), ids.len(), "backward returned the wrong number of gradients");
            for (i, g) in input_grads.into_iter().enumerate() {
                if let (Some(id), Some(g)) = (ids[i], g) {
                    assert_eq!(
                        g.shape(),
                        shapes[i].as_slice(),
                        "backward produced a gradient of the wrong shape for input {i}"
                    );
                    grads.accumulate(id, g);
                }
            }
        });
        let id = tape.push(Some(closure));
        {
            let mut nodes = tape.nodes.borrow_mut();
            for input in inputs.iter().filter_map(|v| v.id()) {
                let first = &mut nodes[input].first_use;
                *first = (*first).min(id);
            }
        }
        Var { value, node: Some((tape, id)), derived: None }
    }

    /// Reverse sweep from this scalar: d(self)/d(leaf) for every leaf on the tape.
    ///
    /// The tape's recorded closures are consumed (each runs once and is then dropped, freeing
    /// what it saved); the tape cannot be differentiated a second time.
    ///
    /// # Panics
    /// If `self` is not a single element or is not on a tape.
    pub fn backward(&self) -> Grads {
        assert_eq!(self.len(), 1, "backward: output has shape {:?}, not a scalar", self.shape());
        self.backward_with(Tensor::ones(self.value.raw_dim()))
    }

    /// Reverse sweep seeded with `grad_out` = ∂L/∂self for some outer L (a vector-Jacobian
    /// product). [`Var::backward`] is this with a seed of ones on a scalar.
    ///
    /// # Panics
    /// If `grad_out`'s shape differs from the value's, or `self` is not on a tape.
    pub fn backward_with(&self, grad_out: Tensor) -> Grads {
        self.sweep(grad_out, &[], &mut |_, _| {})
    }

    /// [`Var::backward`] that hands over each gradient of `watch` as soon as it is complete:
    /// `on_final(k, g)` is called once for every k, when the sweep has run every op that uses
    /// `watch[k]` (so leaves used last in the forward pass come first), with `None` where the
    /// output does not depend on it. What a data-parallel step uses to send the last layers'
    /// gradients while the first layers' are still being computed (docs/distributed.md).
    ///
    /// # Panics
    /// As [`Var::backward`]; also if a watched value is on another tape.
    pub fn backward_notify(&self, watch: &[&Var], on_final: &mut dyn FnMut(usize, Option<&Tensor>)) -> Grads {
        assert_eq!(self.len(), 1, "backward: output has shape {:?}, not a scalar", self.shape());
        self.sweep(Tensor::ones(self.value.raw_dim()), watch, on_final)
    }

    /// The reverse sweep seeded with `grad_out`, telling `on_final` about `watch` (see
    /// [`Var::backward_notify`]).
    fn sweep(
        &self,
        grad_out: Tensor,
        watch: &[&Var],
        on_final: &mut dyn FnMut(usize, Option<&Tensor>),
    ) -> Grads {
        // A documented precondition (# Panics), not a run-time condition: the crate calls this
        // only on a loss computed from parameters bound to a tape.
        let (tape, root) = self.node.as_ref().expect("backward: value is not on a tape");
        assert_eq!(grad_out.shape(), self.shape(), "backward_with: seed shape differs from value");
        for v in watch {
            if let Some((t, _)) = &v.node {
                assert!(t.same(tape), "backward_notify: a watched value is on another tape");
            }
        }
        let mut nodes = std::mem::take(&mut *tape.nodes.borrow_mut());
        // The watched values by the node after whose backward step they are complete; those no
        // op up to the root uses (or constants) are told at the end.
        // (Nothing to track for a plain backward pass, the single-process training step.)
        let mut complete_after: Vec<Vec<usize>> =
            if watch.is_empty() { vec![] } else { vec![vec![]; nodes.len()] };
        let mut at_end = vec![];
        for (k, v) in watch.iter().enumerate() {
            match v.id().map(|id| nodes[id].first_use) {
                Some(first) if first <= *root => complete_after[first].push(k),
                _ => at_end.push(k),
            }
        }
        let mut grads = Grads { slots: (0..nodes.len()).map(|_| None).collect() };
        grads.accumulate(*root, grad_out);
        for id in (0..=*root).rev() {
            if let Some(backward) = nodes[id].backward.take() {
                if let Some(g) = grads.slots[id].take() {
                    backward(g, &mut grads);
                }
            }
            for &k in complete_after.get(id).map_or(&[][..], Vec::as_slice) {
                on_final(k, grads.get(watch[k]));
            }
        }
        for k in at_end {
            on_final(k, grads.get(watch[k]));
        }
        grads
    }
}

/// Accumulations of at least this many elements run on the rayon pool (elementwise, so the
/// result does not depend on the thread count).
const PAR_ACCUMULATE_MIN: usize = 1 << 15;

/// Gradients of a scalar with respect to the leaves of a tape, indexed by node.
pub struct Grads {
    slots: Vec<Option<Tensor>>,
}

impl fmt::Debug for Grads {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let held = self.slots.iter().filter(|s| s.is_some()).count();
        write!(f, "Grads({held} of {} nodes)", self.slots.len())
    }
}

impl Grads {
    /// Adds `grad` to the gradient held for node `id` (the first contribution is moved in).
    pub fn accumulate(&mut self, id: usize, grad: Tensor) {
        match &mut self.slots[id] {
            Some(g) if g.len() >= PAR_ACCUMULATE_MIN => {
                ndarray::Zip::from(g).and(&grad).par_for_each(|a, &b| *a += b)
            }
            Some(g) => *g += &grad,
            slot @ None => *slot = Some(standard_layout(grad)),
        }
    }

    /// The gradient of a leaf, or `None` if the output does not depend on it.
    pub fn get(&self, var: &Var) -> Option<&Tensor> {
        var.id().and_then(|id| self.slots.get(id)).and_then(|s| s.as_ref())
    }

    /// Takes the gradient of a leaf out of the store.
    pub fn take(&mut self, var: &Var) -> Option<Tensor> {
        var.id().and_then(|id| self.slots.get_mut(id)).and_then(|s| s.take())
    }

    /// The gradient of a leaf, zeros of its shape if the output does not depend on it.
    pub fn get_or_zeros(&self, var: &Var) -> Tensor {
        self.get(var).cloned().unwrap_or_else(|| Tensor::zeros(var.shape()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::arr0;

    fn scalar(x: f32) -> Tensor {
        arr0(x).into_dyn()
    }

    /// A frozen value keeps one derived value per type, shared by its clones and detached
    /// copies; no other value keeps any.
    #[test]
    fn only_frozen_values_keep_what_is_derived_from_them() {
        let frozen = Var::frozen(Rc::new(scalar(2.0)));
        let mut made = 0;
        let a = frozen.derived(|| {
            made += 1;
            vec![1u8]
        });
        let b = frozen.clone().derived(|| {
            made += 1;
            vec![2u8]
        });
        let c = frozen.detach().derived(|| vec![3u8]);
        let other_type = frozen.derived(|| 4u32);
        assert_eq!(made, 1, "made once");
        let (a, b, c) = (a.expect("frozen"), b.expect("frozen"), c.expect("frozen"));
        assert!(Rc::ptr_eq(&a, &b) && Rc::ptr_eq(&a, &c) && *a == [1u8], "one value, shared");
        assert_eq!(other_type.as_deref(), Some(&4u32), "a second type, kept beside the first");
        let tape = Tape::new();
        assert!(Var::constant(scalar(1.0)).derived(|| 0u8).is_none());
        assert!(tape.var(scalar(1.0)).derived(|| 0u8).is_none());
    }

    /// y = a * b recorded by hand, to test the tape without the ops module.
    fn mul(a: &Var, b: &Var) -> Var {
        let (av, bv) = (a.value_rc(), b.value_rc());
        let value = &*av * &*bv;
        Var::record([a, b], value, move |g, needs| [needs[0].then(|| g * &*bv), needs[1].then(|| g * &*av)])
    }

    #[test]
    fn value_used_twice_receives_both_gradients() {
        let tape = Tape::new();
        let x = tape.var(scalar(3.0));
        let y = mul(&x, &x); // dy/dx = 2x
        let grads = y.backward();
        assert_eq!(grads.get(&x).unwrap()[[]], 6.0);
    }

    #[test]
    fn detach_stops_gradient() {
        let tape = Tape::new();
        let x = tape.var(scalar(3.0));
        let y = mul(&x, &x.detach()); // d/dx (x * c) = c
        let grads = y.backward();
        assert_eq!(grads.get(&x).unwrap()[[]], 3.0);
    }

    #[test]
    fn constants_record_nothing() {
        let tape = Tape::new();
        let a = Var::constant(scalar(2.0));
        let y = mul(&a, &a);
        assert!(!y.requires_grad());
        assert!(tape.is_empty());
    }

    #[test]
    fn unused_leaf_has_no_gradient() {
        let tape = Tape::new();
        let x = tape.var(scalar(1.0));
        let z = tape.var(scalar(5.0));
        let y = mul(&x, &x);
        let grads = y.backward();
        assert!(grads.get(&z).is_none());
        assert_eq!(grads.get_or_zeros(&z)[[]], 0.0);
    }

    #[test]
    fn each_watched_gradient_is_handed_over_once_complete_last_used_first() {
        // y = ((a·b)·c)·a: c completes first; a and b, first used by the same op, complete
        // together after it (in the order watched), although a is used again later.
        let build = || {
            let tape = Tape::new();
            let (a, b, c) = (tape.var(scalar(2.0)), tape.var(scalar(3.0)), tape.var(scalar(5.0)));
            let unused = tape.var(scalar(7.0));
            let y = mul(&mul(&mul(&a, &b), &c), &a);
            (y, [a, b, c, unused])
        };
        let (y, leaves) = build();
        let constant = Var::constant(scalar(1.0));
        let watch = [&leaves[0], &leaves[1], &leaves[2], &leaves[3], &constant];
        let mut told: Vec<(usize, Option<f32>)> = vec![];
        let grads = y.backward_notify(&watch, &mut |k, g| told.push((k, g.map(|g| g[[]]))));
        // dy/da = 2abc = 60, dy/db = a²c = 20, dy/dc = a²b = 12: complete when handed over.
        assert_eq!(told, vec![(2, Some(12.0)), (0, Some(60.0)), (1, Some(20.0)), (3, None), (4, None)]);
        // The same gradients as a plain backward pass, and still in the store.
        let (y2, leaves2) = build();
        let plain = y2.backward();
        for (v, v2) in leaves.iter().zip(&leaves2).take(3) {
            assert_eq!(grads.get(v).unwrap()[[]], plain.get(v2).unwrap()[[]]);
        }
    }
}
