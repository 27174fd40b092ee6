//! Differentiable ops on [`Var`](crate::Var): one file per family, each op's forward and backward
//! side by side.
