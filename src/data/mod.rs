//! Datasets: image folders, IDX, CIFAR-10 binaries, seeded batches.
