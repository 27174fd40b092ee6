//! Files: checkpoints (safetensors), PNG grids, npz.
