//! ResNet-18 over 224×224 RGB images, as candle-transformers builds it from torchvision-named
//! weights (a torchvision `state_dict` saved with `safetensors.torch.save_file` loads as is).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Func, VarBuilder};

pub struct Resnet18 {
    net: Func<'static>,
}

impl Resnet18 {
    pub fn new(vb: VarBuilder<'static>, classes: usize) -> Result<Self> {
        Ok(Self { net: candle_transformers::models::resnet::resnet18(classes, vb)? })
    }
}

impl Module for Resnet18 {
    /// Logits for a (batch, 3, height, width) tensor.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.net.forward(xs)
    }
}
