//! A small CNN for 8×8 greyscale digits: two 3×3 convolutions, a 2×2 max-pool, two dense layers.
//! No dropout: it would draw from an unseeded generator and `sluice train` must be reproducible.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, Linear, VarBuilder, conv2d, linear};

use super::conv::GemmConv2d;

pub struct DigitsCnn {
    conv1: GemmConv2d,
    conv2: GemmConv2d,
    fc1: Linear,
    fc2: Linear,
}

const CONV1: usize = 16;
const CONV2: usize = 32;
const HIDDEN: usize = 64;

impl DigitsCnn {
    /// Builds the network over `vb`; `input` is (channels, height, width).
    pub fn new(vb: VarBuilder, input: (usize, usize, usize), classes: usize) -> Result<Self> {
        let (channels, height, width) = input;
        let same = Conv2dConfig { padding: 1, ..Default::default() };
        Ok(Self {
            conv1: GemmConv2d::new(conv2d(channels, CONV1, 3, same, vb.pp("conv1"))?)?,
            conv2: GemmConv2d::new(conv2d(CONV1, CONV2, 3, same, vb.pp("conv2"))?)?,
            fc1: linear(CONV2 * (height / 2) * (width / 2), HIDDEN, vb.pp("fc1"))?,
            fc2: linear(HIDDEN, classes, vb.pp("fc2"))?,
        })
    }
}

impl Module for DigitsCnn {
    /// Logits for a (batch, channels, height, width) tensor.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.conv1.forward(xs)?.relu()?;
        let xs = self.conv2.forward(&xs)?.relu()?.max_pool2d(2)?.flatten_from(1)?;
        let xs = self.fc1.forward(&xs)?.relu()?;
        self.fc2.forward(&xs)
    }
}
