//! A small CNN for 8×8 greyscale digits: two 3×3 convolutions, a 2×2 max-pool, two dense layers.
//! No dropout: it would draw from an unseeded generator and `sluice train` must be reproducible.

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, Linear, VarBuilder, conv2d, linear};
use rayon::prelude::*;

use super::conv::{GemmConv2d, MaxPoolFlatten, Planes};
use super::direct::DirectDigits;

pub struct DigitsCnn {
    conv1: GemmConv2d,
    conv2: GemmConv2d,
    fc1: Linear,
    fc2: Linear,
    /// On a CPU with AVX2 and FMA, outside training: the whole network as one direct kernel.
    direct: Option<DirectDigits>,
}

const CONV1: usize = 16;
const CONV2: usize = 32;
const HIDDEN: usize = 64;

impl DigitsCnn {
    /// Builds the network over `vb`; `input` is (channels, height, width).
    pub fn new(vb: VarBuilder, input: (usize, usize, usize), classes: usize) -> Result<Self> {
        let (channels, height, width) = input;
        let same = Conv2dConfig { padding: 1, ..Default::default() };
        let conv1 = conv2d(channels, CONV1, 3, same, vb.pp("conv1"))?;
        let conv2 = conv2d(CONV1, CONV2, 3, same, vb.pp("conv2"))?;
        let fc1 = linear(CONV2 * (height / 2) * (width / 2), HIDDEN, vb.pp("fc1"))?;
        let fc2 = linear(HIDDEN, classes, vb.pp("fc2"))?;
        // Loaded weights only: variables, as in training, keep Candle's differentiable ops.
        let loaded = [conv1.weight(), conv2.weight(), fc1.weight(), fc2.weight()]
            .into_iter()
            .all(|t| matches!(t.device(), Device::Cpu) && !t.is_variable());
        let direct = match loaded {
            true => DirectDigits::new(
                [(conv1.weight(), conv1.bias()), (conv2.weight(), conv2.bias())],
                [(fc1.weight(), fc1.bias()), (fc2.weight(), fc2.bias())],
                (height, width),
            )?,
            false => None,
        };
        Ok(Self { conv1: GemmConv2d::new(conv1)?, conv2: GemmConv2d::new(conv2)?, fc1, fc2, direct })
    }
}

/// The most images a task takes on the CPU: a batch runs as chunks spread over the threads,
/// each chunk's buffers small enough to stay in its core's cache (the direct kernel's pooled
/// values for its dense layers, 32 × 512, in L2).
const CHUNK: usize = 32;

/// Images a task takes of a CPU batch of `batch`: at most [`CHUNK`], and at least a chunk per
/// thread — the matrices of a few images are too small for a matrix product to share among
/// threads without costing more than it saves. Both CPU paths, the direct kernel's and the
/// GEMM one, cut their batches so.
pub(super) fn chunk(batch: usize) -> usize {
    CHUNK.min(batch.div_ceil(rayon::current_num_threads())).max(1)
}

impl Module for DigitsCnn {
    /// Logits for a (batch, channels, height, width) tensor.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if let Some(direct) = &self.direct
            && matches!(xs.device(), Device::Cpu)
        {
            // The whole batch in one op, which spreads it over the threads itself.
            return xs.apply_op1_no_bwd(direct);
        }
        let batch = xs.dim(0)?;
        let chunk = chunk(batch);
        if chunk >= batch || !matches!(xs.device(), Device::Cpu) {
            return self.forward_chunk(xs);
        }
        let chunks = (0..batch.div_ceil(chunk))
            .into_par_iter()
            .map(|i| self.forward_chunk(&xs.narrow(0, i * chunk, chunk.min(batch - i * chunk))?))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&chunks, 0)
    }
}

impl DigitsCnn {
    fn forward_chunk(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = match (self.conv1.cpu_gemm(xs), self.conv2.cpu_gemm(xs)) {
            // On the CPU the activations stay channel first from one convolution to the next
            // and into the pooling, each ReLU in the pass that adds the bias.
            (Some(conv1), Some(conv2)) => {
                let xs = conv1.forward(xs, Planes::Nchw, None, true)?;
                conv2.forward(&xs, Planes::Cnhw, None, true)?.apply_op1_no_bwd(&MaxPoolFlatten)?
            }
            _ => {
                let xs = self.conv1.forward_relu(xs)?;
                self.conv2.forward_relu(&xs)?.max_pool2d(2)?.flatten_from(1)?
            }
        };
        let xs = self.fc1.forward(&xs)?.relu()?;
        self.fc2.forward(&xs)
    }
}
