//! The diffusion math of Ho et al. 2020 (arXiv:2006.11239) and Nichol & Dhariwal 2021
//! (arXiv:2102.09672).
