//! ResNet-18 over 224×224 RGB images, from torchvision-named weights (a torchvision `state_dict`
//! saved with `safetensors.torch.save_file` loads as is).
//!
//! Built for inference, as ONNX Runtime builds it: each batch norm is folded into the weights and
//! bias of the convolution before it when the bundle loads. On the CPU the activations stay
//! channel first (CNHW) from the first convolution to the pooling, each convolution is one matrix
//! product (im2col, then the kernel times the patches) and its bias, the residual and the ReLU
//! one pass over that ([`GemmConv`]); a batch's images run one per task, spread over the threads,
//! so that each image's patch matrices stay near its core's cache and no convolution waits on
//! another thread.
//! On a GPU each convolution with its bias, residual and ReLU is one cuDNN call ([`CudnnConv`]);
//! Candle's convolution over the same folded weights runs where cuDNN is not (and in the tests).

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder, linear};
use rayon::prelude::*;

use super::conv::{GemmConv, MaxPool3x3Stride2, Planes, Window};
use super::cudnn::{self, CudnnConv};

/// torchvision's batch norm epsilon.
const BN_EPS: f64 = 1e-5;

/// Basic blocks the CPU runs image by image: layers 1 and 2 (see `Resnet18::forward_cpu`).
const IMAGE_BY_IMAGE: usize = 4;
/// Images layers 3 and 4 take at once on the CPU. Measured on a 2-core VM, ResNet-18 at batch
/// 128 (docs/benchmarks.md, nineteenth session): groups of 16 ran faster than of 8 or 32, and
/// than image by image; a group also bounds what a big batch holds at once.
const GROUP: usize = 16;

pub struct Resnet18 {
    stem: FoldedConv,
    blocks: Vec<BasicBlock>,
    fc: Linear,
}

impl Resnet18 {
    pub fn new(vb: VarBuilder, classes: usize) -> Result<Self> {
        let stem = FoldedConv::load(&vb, "conv1", "bn1", (3, 64), Window { size: 7, stride: 2, padding: 3 })?;
        let mut blocks = Vec::new();
        let mut channels = 64;
        for (layer, out) in [(1, 64), (2, 128), (3, 256), (4, 512)] {
            for index in 0..2 {
                let stride = if layer > 1 && index == 0 { 2 } else { 1 };
                blocks.push(BasicBlock::load(&vb.pp(format!("layer{layer}.{index}")), channels, out, stride)?);
                channels = out;
            }
        }
        Ok(Self { stem, blocks, fc: linear(512, classes, vb.pp("fc"))? })
    }

    /// The pooled features, (N, 512), channel first from the stem on. The stem and layers 1–2
    /// run image by image, each image a task, the images spread over the threads: their
    /// activations are big and their weights small, and each thread's convolutions run whole,
    /// with no hand-off between threads inside them (a lone image's spread over the threads
    /// instead, by their own parallel loops). Layers 3–4 run over groups of [`GROUP`] images
    /// at once, each convolution's product shared among the threads: their weights are big (up
    /// to 16 MiB of Winograd-transformed kernel a convolution) and their activations small, and
    /// image by image every image streamed all of them from memory again.
    fn forward_cpu(&self, xs: &Tensor) -> Result<Tensor> {
        let n = xs.dim(0)?;
        let groups = (0..n)
            .step_by(GROUP)
            .map(|start| {
                let images = (start..start + GROUP.min(n - start))
                    .into_par_iter()
                    .map(|image| {
                        let xs = self.stem.cpu(&xs.narrow(0, image, 1)?, Planes::Nchw, None, true)?;
                        self.blocks[..IMAGE_BY_IMAGE]
                            .iter()
                            .try_fold(max_pool(&xs)?, |xs, block| block.forward_cpu(&xs))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let xs = self.blocks[IMAGE_BY_IMAGE..]
                    .iter()
                    .try_fold(Tensor::cat(&images, 1)?, |xs, block| block.forward_cpu(&xs))?;
                // (512, images, 7, 7) → (512, images)
                xs.mean(D::Minus1)?.mean(D::Minus1)
            })
            .collect::<Result<Vec<_>>>()?;
        // (512, N) → (N, 512)
        Tensor::cat(&groups, 1)?.t()?.contiguous()
    }

    fn forward_other(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = max_pool(&self.stem.other(xs, None, true)?)?;
        for block in &self.blocks {
            xs = block.forward_other(&xs)?;
        }
        xs.mean(D::Minus1)?.mean(D::Minus1)
    }
}

impl Module for Resnet18 {
    /// Logits for a (batch, 3, height, width) tensor.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let features = if matches!(xs.device(), Device::Cpu) { self.forward_cpu(xs)? } else { self.forward_other(xs)? };
        self.fc.forward(&features)
    }
}

/// 3×3 max pool, stride 2, padding 1, over the last two dimensions: cuDNN's on a GPU, one pass
/// of ours on the CPU. The input comes out of a ReLU, so padding with zeros never changes a
/// maximum.
fn max_pool(xs: &Tensor) -> Result<Tensor> {
    if xs.device().is_cuda() {
        return cudnn::max_pool(xs, Window { size: 3, stride: 2, padding: 1 });
    }
    if matches!(xs.device(), Device::Cpu) && xs.dtype() == DType::F32 {
        return xs.apply_op1_no_bwd(&MaxPool3x3Stride2);
    }
    xs.pad_with_zeros(D::Minus1, 1, 1)?.pad_with_zeros(D::Minus2, 1, 1)?.max_pool2d_with_stride(3, 2)
}

/// Two 3×3 convolutions and a shortcut (a strided 1×1 convolution where the shape changes).
struct BasicBlock {
    conv1: FoldedConv,
    conv2: FoldedConv,
    downsample: Option<FoldedConv>,
}

impl BasicBlock {
    fn load(vb: &VarBuilder, c_in: usize, c_out: usize, stride: usize) -> Result<Self> {
        let three = |stride| Window { size: 3, stride, padding: 1 };
        let downsample = (stride != 1 || c_in != c_out)
            .then(|| {
                let window = Window { size: 1, stride, padding: 0 };
                FoldedConv::load(vb, "downsample.0", "downsample.1", (c_in, c_out), window)
            })
            .transpose()?;
        Ok(Self {
            conv1: FoldedConv::load(vb, "conv1", "bn1", (c_in, c_out), three(stride))?,
            conv2: FoldedConv::load(vb, "conv2", "bn2", (c_out, c_out), three(1))?,
            downsample,
        })
    }

    fn forward_cpu(&self, xs: &Tensor) -> Result<Tensor> {
        let shortcut = match &self.downsample {
            Some(conv) => conv.cpu(xs, Planes::Cnhw, None, false)?,
            None => xs.clone(),
        };
        let ys = self.conv1.cpu(xs, Planes::Cnhw, None, true)?;
        self.conv2.cpu(&ys, Planes::Cnhw, Some(&shortcut), true)
    }

    fn forward_other(&self, xs: &Tensor) -> Result<Tensor> {
        let shortcut = match &self.downsample {
            Some(conv) => conv.other(xs, None, false)?,
            None => xs.clone(),
        };
        let ys = self.conv1.other(xs, None, true)?;
        self.conv2.other(&ys, Some(&shortcut), true)
    }
}

/// A convolution with the batch norm after it folded in: `w·γ/σ` and `β − μ·γ/σ`, σ the running
/// variance's square root (plus epsilon).
struct FoldedConv {
    weight: Tensor,
    /// (1, O, 1, 1), for Candle's convolution.
    bias: Tensor,
    window: Window,
    gemm: GemmConv,
    /// The same on cuDNN, where the weights are on a GPU.
    gpu: Option<CudnnConv>,
}

impl FoldedConv {
    fn load(vb: &VarBuilder, conv: &str, bn: &str, (c_in, c_out): (usize, usize), window: Window) -> Result<Self> {
        // Folded in f32 whatever the model computes in, then converted.
        let f32 = |t: Result<Tensor>| t?.to_dtype(DType::F32);
        let weight = f32(vb.pp(conv).get((c_out, c_in, window.size, window.size), "weight"))?;
        let bn = vb.pp(bn);
        let [gamma, beta, mean, var] =
            ["weight", "bias", "running_mean", "running_var"].map(|name| f32(bn.get(c_out, name)));
        let scale = (gamma? / (var? + BN_EPS)?.sqrt()?)?;
        let weight = weight.broadcast_mul(&scale.reshape((c_out, 1, 1, 1))?)?;
        let bias = (beta? - (mean? * &scale)?)?;
        let gemm = GemmConv::new(&weight.to_device(&Device::Cpu)?, bias.to_device(&Device::Cpu)?.to_vec1()?, window)?;
        let (weight, bias) = (weight.to_dtype(vb.dtype())?, bias.to_dtype(vb.dtype())?);
        let gpu = CudnnConv::on_gpu(&weight, &bias, window)?;
        Ok(Self { weight, bias: bias.reshape((1, c_out, 1, 1))?, window, gemm, gpu })
    }

    /// On the CPU: the output channel first.
    fn cpu(&self, xs: &Tensor, planes: Planes, residual: Option<&Tensor>, relu: bool) -> Result<Tensor> {
        self.gemm.forward(xs, planes, residual, relu)
    }

    /// Batch first, off the CPU: cuDNN's fused call on a GPU, else Candle's convolution.
    fn other(&self, xs: &Tensor, residual: Option<&Tensor>, relu: bool) -> Result<Tensor> {
        if let Some(gpu) = &self.gpu
            && let Some(ys) = gpu.forward(xs, residual, relu)?
        {
            return Ok(ys);
        }
        self.candle(xs, residual, relu)
    }

    /// Candle's convolution, batch first.
    fn candle(&self, xs: &Tensor, residual: Option<&Tensor>, relu: bool) -> Result<Tensor> {
        let Window { stride, padding, .. } = self.window;
        let mut ys = xs.conv2d(&self.weight, padding, stride, 1, 1)?.broadcast_add(&self.bias)?;
        if let Some(residual) = residual {
            ys = (ys + residual)?;
        }
        if relu { ys.relu() } else { Ok(ys) }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Module, Tensor};
    use candle_nn::{VarBuilder, VarMap};

    use super::Resnet18;

    /// candle-transformers' ResNet-18 over random weights with batch norms far from identity, and
    /// those weights.
    fn reference() -> (candle_nn::Func<'static>, VarMap) {
        let device = Device::Cpu;
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &device);
        let reference = candle_transformers::models::resnet::resnet18(10, vb).unwrap();
        for (name, var) in vars.data().lock().unwrap().iter() {
            let batch_norm = name.contains("bn") || name.contains("downsample.1");
            let scale = name.ends_with("running_var") || (batch_norm && name.ends_with("weight"));
            let (low, high) = if scale { (0.5, 1.5) } else { (-0.1, 0.1) };
            let values = Tensor::rand(low as f32, high as f32, var.shape(), &device).unwrap();
            var.set(&values).unwrap();
        }
        (reference, vars)
    }

    /// Ours over the same weights, held in `dtype`.
    fn ours(vars: &VarMap, dtype: DType) -> Resnet18 {
        let tensors: HashMap<String, Tensor> =
            vars.data().lock().unwrap().iter().map(|(name, var)| (name.clone(), var.as_tensor().clone())).collect();
        Resnet18::new(VarBuilder::from_tensors(tensors, dtype, &Device::Cpu), 10).unwrap()
    }

    /// The largest difference over the largest logit wanted.
    fn relative_error(got: &Tensor, want: &Tensor) -> f32 {
        let scale: f32 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        let worst: f32 = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        worst / scale.max(1.0)
    }

    /// The folded, channel-first network (its images spread over threads, then in groups: a
    /// whole one and a part) against the plain one.
    #[test]
    fn agrees_with_the_unfolded_network() {
        let (reference, vars) = reference();
        let xs = Tensor::randn(0f32, 1.0, (super::GROUP + 3, 3, 64, 64), &Device::Cpu).unwrap();
        let error = relative_error(&ours(&vars, DType::F32).forward(&xs).unwrap(), &reference.forward(&xs).unwrap());
        assert!(error <= 1e-4, "differs by {error} of the largest logit");
    }

    /// What a GPU runs (Candle's convolutions over the folded weights), run here on the CPU: the
    /// same as the plain network in f32, and close in f16 (weights and inputs converted).
    #[test]
    fn the_graph_other_devices_run_agrees_in_f32_and_f16() {
        let (reference, vars) = reference();
        let xs = Tensor::randn(0f32, 1.0, (2, 3, 64, 64), &Device::Cpu).unwrap();
        let want = reference.forward(&xs).unwrap();
        let other = |model: &Resnet18, xs: &Tensor| {
            model.fc.forward(&model.forward_other(xs).unwrap()).unwrap().to_dtype(DType::F32).unwrap()
        };
        let error = relative_error(&other(&ours(&vars, DType::F32), &xs), &want);
        assert!(error <= 1e-4, "f32 differs by {error} of the largest logit");
        let half = other(&ours(&vars, DType::F16), &xs.to_dtype(DType::F16).unwrap());
        let error = relative_error(&half, &want);
        assert!(error <= 5e-3, "f16 differs by {error} of the largest logit");
    }
}
