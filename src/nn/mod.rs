//! Parameters, layers, the U-Net, Adam and EMA.
