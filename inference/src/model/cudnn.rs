//! Convolutions and max-pools on an NVIDIA GPU through cuDNN, run as PyTorch runs them.
//!
//! Candle's own cuDNN convolution (candle-core's `cudnn` feature) is a bare convolution: the bias,
//! residual and ReLU after it are a kernel and a fresh tensor each, and it leaves cuDNN's math at
//! its default, which lets f32 convolutions run on TF32 tensor cores (7.9e-4 from the CPU's f32
//! outputs on ResNet-18, over f32's 1e-4). Here a convolution is one
//! `cudnnConvolutionBiasActivationForward` call, `relu(conv(x) + bias + residual)`, with the math
//! the model's precision asks for (FMA for f32; tensor cores for tf32, f16 and bf16), and its
//! algorithm chosen once per shape (cuDNN's heuristics, as PyTorch's default). A convolution
//! cuDNN refuses that call for (not every type configuration has it) says so once in the log and
//! runs as Candle's from then on.
//!
//! Measured on an H100 (docs/benchmarks.md): ResNet-18 at 2.7-13× the throughput of Candle's own
//! cuDNN convolutions at batches 8 and 32, 1.4-2× at 512 (`sluice bench cuda --candle-convolutions`
//! times those), which ask cuDNN's heuristics for an algorithm and allocate a zeroed workspace on
//! every call, then run bias, residual and ReLU as three more kernels.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{Result, Tensor};

use super::conv::Window;

/// A convolution and its bias (in ResNet-18, with the batch norm after it folded in) on cuDNN.
pub(crate) struct CudnnConv {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    inner: gpu::Conv,
}

impl CudnnConv {
    /// For a `weight` (O, C, K, K) and `bias` (O) on a CUDA device; None on any other (and in a
    /// build without `cuda`). Tensor cores are used unless the weights are f32 and TF32 is off
    /// (`candle_core::cuda::gemm_reduced_precision_f32`, which the model's precision sets before
    /// it loads).
    pub(crate) fn on_gpu(weight: &Tensor, bias: &Tensor, window: Window) -> Result<Option<Self>> {
        if !weight.device().is_cuda() {
            return Ok(None);
        }
        Ok(gpu::Conv::new(weight, bias, window)?.map(|inner| Self { inner }))
    }

    /// `relu(conv(xs) + bias + residual)` (no ReLU unless `relu`, no residual unless given), or
    /// None where cuDNN refuses the call: the caller runs Candle's convolution then.
    pub(crate) fn forward(&self, xs: &Tensor, residual: Option<&Tensor>, relu: bool) -> Result<Option<Tensor>> {
        if !FUSED.load(Ordering::Relaxed) {
            return Ok(None);
        }
        self.inner.forward(xs, residual, relu)
    }
}

/// Whether convolutions on a GPU run as the fused cuDNN call (the default) or as Candle's.
static FUSED: AtomicBool = AtomicBool::new(true);

/// Runs GPU convolutions as Candle's (its own cuDNN convolution, then bias, residual and ReLU as
/// tensors) instead of one fused call each, for the whole process: `sluice bench cuda
/// --candle-convolutions`, to see what the fused call is worth. Candle's leaves cuDNN's math at
/// its default (TF32 for f32 on Ampere and later) unless `NVIDIA_TF32_OVERRIDE=0` is set.
pub fn use_candle_convolutions(candle: bool) {
    FUSED.store(!candle, Ordering::Relaxed);
}

/// Max-pool over the last two dimensions of an NCHW tensor on a CUDA device, the padding left out
/// of each window (cuDNN's), in one kernel; Candle's needs the padding as a copy first.
pub(crate) fn max_pool(xs: &Tensor, window: Window) -> Result<Tensor> {
    gpu::max_pool(xs, window)
}

#[cfg(not(feature = "cuda"))]
mod gpu {
    //! A build without `cuda` has no GPU tensors: nothing here is reached.

    use candle_core::{Result, Tensor};

    use super::Window;

    pub(super) enum Conv {}

    impl Conv {
        pub(super) fn new(_: &Tensor, _: &Tensor, _: Window) -> Result<Option<Self>> {
            Ok(None)
        }

        pub(super) fn forward(&self, _: &Tensor, _: Option<&Tensor>, _: bool) -> Result<Option<Tensor>> {
            match *self {}
        }
    }

    pub(super) fn max_pool(_: &Tensor, _: Window) -> Result<Tensor> {
        candle_core::bail!("cuDNN's max-pool needs a build with `cuda`")
    }
}

#[cfg(feature = "cuda")]
#[allow(unsafe_code)] // cuDNN's calls are FFI; each use says why it is sound
mod gpu {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::marker::PhantomData;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::cudnn::{
        ActivationDescriptor, ConvBiasActivationForward, ConvDescriptor, Cudnn, CudnnDataType, CudnnError,
        FilterDescriptor, PoolingForward, TensorDescriptor, sys,
    };
    use candle_core::cuda_backend::cudarc::driver::{
        self, CudaStream, CudaView, DevicePtr, DeviceRepr, DeviceSlice, SyncOnDrop, ValidAsZeroBits,
    };
    use candle_core::cuda_backend::{CudaDType, DeviceId};
    use candle_core::{
        CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor,
        WithDType,
    };

    use super::Window;

    pub(super) struct Conv {
        weight: Tensor,
        /// (O,), contiguous.
        bias: Tensor,
        window: Window,
        tensor_cores: bool,
        /// cuDNN refused the fused call for this convolution once: it is not asked again.
        refused: AtomicBool,
    }

    impl Conv {
        pub(super) fn new(weight: &Tensor, bias: &Tensor, window: Window) -> Result<Option<Self>> {
            let tensor_cores = weight.dtype() != DType::F32 || candle_core::cuda::gemm_reduced_precision_f32();
            Ok(Some(Self {
                weight: weight.contiguous()?,
                bias: bias.flatten_all()?.contiguous()?,
                window,
                tensor_cores,
                refused: AtomicBool::new(false),
            }))
        }

        pub(super) fn forward(&self, xs: &Tensor, residual: Option<&Tensor>, relu: bool) -> Result<Option<Tensor>> {
            if self.refused.load(Ordering::Relaxed) {
                return Ok(None);
            }
            let op = Fused { conv: self, relu };
            let xs = xs.contiguous()?;
            let out = match residual {
                Some(residual) => xs.apply_op2_no_bwd(&residual.contiguous()?, &op),
                None => xs.apply_op1_no_bwd(&op),
            };
            match out {
                Err(_) if self.refused.load(Ordering::Relaxed) => Ok(None),
                out => out.map(Some),
            }
        }
    }

    /// One call of [`Conv`]: the op Candle runs over the input (and the residual).
    struct Fused<'a> {
        conv: &'a Conv,
        relu: bool,
    }

    impl CustomOp1 for Fused<'_> {
        fn name(&self) -> &'static str {
            "cudnn-conv-bias-activation"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("cuDNN convolutions run on a GPU")
        }

        fn cuda_fwd(&self, xs: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
            self.run(xs, layout, None)
        }
    }

    impl CustomOp2 for Fused<'_> {
        fn name(&self) -> &'static str {
            "cudnn-conv-bias-add-activation"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("cuDNN convolutions run on a GPU")
        }

        fn cuda_fwd(
            &self,
            xs: &CudaStorage,
            layout: &Layout,
            residual: &CudaStorage,
            residual_layout: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            self.run(xs, layout, Some((residual, residual_layout)))
        }
    }

    /// The shapes of one convolution call.
    #[derive(Clone, Copy, PartialEq, Eq, Hash)]
    struct Geometry {
        input: [usize; 4],
        kernel: [usize; 4],
        stride: usize,
        padding: usize,
    }

    impl Geometry {
        fn output(&self) -> [usize; 4] {
            let [n, _, h, w] = self.input;
            let out = |size: usize| (size + 2 * self.padding - self.kernel[2]) / self.stride + 1;
            [n, self.kernel[0], out(h), out(w)]
        }
    }

    /// What a convolution's algorithm is chosen by: the same geometry, types and math choose the
    /// same one.
    #[derive(Clone, Copy, PartialEq, Eq, Hash)]
    struct PlanKey {
        geometry: Geometry,
        dtype: &'static str,
        tensor_cores: bool,
        relu: bool,
    }

    thread_local! {
        // cuDNN handles are neither Send nor Sync: one per thread and device (as Candle keeps its own).
        static HANDLES: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
        // The algorithm and workspace bytes chosen for each convolution seen on this thread.
        static PLANS: RefCell<HashMap<PlanKey, (sys::cudnnConvolutionFwdAlgo_t, usize)>> = RefCell::new(HashMap::new());
    }

    fn handle(device: &CudaDevice) -> Result<Arc<Cudnn>> {
        HANDLES.with(|handles| {
            if let Some(handle) = handles.borrow().get(&device.id()) {
                return Ok(handle.clone());
            }
            let handle = Cudnn::new(device.cuda_stream()).map_err(candle_core::Error::wrap)?;
            handles.borrow_mut().insert(device.id(), handle.clone());
            Ok(handle)
        })
    }

    fn dims4(layout: &Layout, what: &str) -> Result<[usize; 4]> {
        match *layout.dims() {
            [a, b, c, d] if layout.is_contiguous() => Ok([a, b, c, d]),
            _ => candle_core::bail!("{what}: a contiguous 4-D tensor, not {:?}", layout.shape()),
        }
    }

    /// A tensor's values on the device, from where its layout starts.
    fn view<'a, T: CudaDType>(storage: &'a CudaStorage, layout: &Layout) -> Result<CudaView<'a, T>> {
        Ok(storage.as_cuda_slice::<T>()?.slice(layout.start_offset()..))
    }

    fn as_i32(dims: [usize; 4]) -> [i32; 4] {
        dims.map(|d| d as i32)
    }

    impl Fused<'_> {
        fn run(
            &self,
            xs: &CudaStorage,
            layout: &Layout,
            residual: Option<(&CudaStorage, &Layout)>,
        ) -> Result<(CudaStorage, Shape)> {
            let conv = self.conv;
            let (weight, weight_layout) = conv.weight.storage_and_layout();
            let (bias, bias_layout) = conv.bias.storage_and_layout();
            let (Storage::Cuda(weight), Storage::Cuda(bias)) = (&*weight, &*bias) else {
                candle_core::bail!("cuDNN convolution: the weights are not on the GPU");
            };
            let geometry = Geometry {
                input: dims4(layout, "cuDNN convolution input")?,
                kernel: dims4(weight_layout, "cuDNN convolution kernel")?,
                stride: conv.window.stride,
                padding: conv.window.padding,
            };
            let output = geometry.output();
            if let Some((_, residual_layout)) = residual
                && dims4(residual_layout, "cuDNN convolution residual")? != output
            {
                candle_core::bail!("residual {:?} for an output {output:?}", residual_layout.shape());
            }
            let args = Args { geometry, layout, weight_layout, bias_layout, residual };
            let slice = match xs.dtype() {
                DType::F32 => self.launch::<f32>(xs, weight, bias, &args)?,
                DType::F16 => self.launch::<half::f16>(xs, weight, bias, &args)?,
                DType::BF16 => self.launch::<half::bf16>(xs, weight, bias, &args)?,
                dtype => candle_core::bail!("cuDNN convolution of {dtype:?}"),
            };
            Ok((slice, Shape::from(output.to_vec())))
        }

        fn launch<T>(
            &self,
            xs: &CudaStorage,
            weight: &CudaStorage,
            bias: &CudaStorage,
            args: &Args,
        ) -> Result<CudaStorage>
        where
            T: CudaDType + CudnnDataType + DeviceRepr + ValidAsZeroBits + WithDType,
        {
            let device = xs.device();
            let stream = device.cuda_stream();
            let cudnn = handle(device)?;
            let Args { geometry, layout, weight_layout, bias_layout, residual } = *args;
            let output = geometry.output();
            let (p, s) = (geometry.padding as i32, geometry.stride as i32);
            let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
            let w_err = candle_core::Error::wrap;
            let mut conv: ConvDescriptor<f32> = cudnn
                .create_conv2d([p, p], [s, s], [1, 1], sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION)
                .map_err(w_err)?;
            let math = if self.conv.tensor_cores {
                sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
            } else {
                sys::cudnnMathType_t::CUDNN_FMA_MATH
            };
            conv.set_math_type(math).map_err(w_err)?;
            let mode = if self.relu {
                sys::cudnnActivationMode_t::CUDNN_ACTIVATION_RELU
            } else {
                sys::cudnnActivationMode_t::CUDNN_ACTIVATION_IDENTITY
            };
            let activation: ActivationDescriptor<f32> = cudnn
                .create_activation(mode, sys::cudnnNanPropagation_t::CUDNN_NOT_PROPAGATE_NAN, 0.0)
                .map_err(w_err)?;
            let x_desc: TensorDescriptor<T> = cudnn.create_4d_tensor(nchw, as_i32(geometry.input)).map_err(w_err)?;
            let w_desc: FilterDescriptor<T> = cudnn.create_4d_filter(nchw, as_i32(geometry.kernel)).map_err(w_err)?;
            let y_desc: TensorDescriptor<T> = cudnn.create_4d_tensor(nchw, as_i32(output)).map_err(w_err)?;
            let b_desc: TensorDescriptor<T> =
                cudnn.create_4d_tensor(nchw, [1, output[1] as i32, 1, 1]).map_err(w_err)?;
            let op = ConvBiasActivationForward {
                conv: &conv,
                act: &activation,
                x: &x_desc,
                w: &w_desc,
                z: &y_desc,
                bias: &b_desc,
                y: &y_desc,
            };
            let key =
                PlanKey { geometry, dtype: T::DTYPE.as_str(), tensor_cores: self.conv.tensor_cores, relu: self.relu };
            let (algorithm, workspace_bytes) = match PLANS.with(|plans| plans.borrow().get(&key).copied()) {
                Some(plan) => plan,
                None => {
                    // With no activation the fused call runs one algorithm only (cuDNN's rule).
                    let algorithm = if self.relu {
                        op.pick_algorithm().map_err(|e| self.refusal(e))?
                    } else {
                        sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM
                    };
                    let bytes = op.get_workspace_size(algorithm).map_err(|e| self.refusal(e))?;
                    PLANS.with(|plans| plans.borrow_mut().insert(key, (algorithm, bytes)));
                    (algorithm, bytes)
                }
            };
            // SAFETY: uninitialised bytes are fine for cuDNN's scratch space.
            let mut workspace =
                (workspace_bytes > 0).then(|| unsafe { device.alloc::<u8>(workspace_bytes) }).transpose()?;
            let elements = output.iter().product::<usize>();
            // With a residual, every output value is written; without one, the output is also the
            // residual read (at weight 0), so it starts as zeros rather than whatever was there.
            let mut ys = match residual {
                // SAFETY: the convolution writes every element before anything reads it.
                Some(_) => unsafe { device.alloc::<T>(elements)? },
                None => device.alloc_zeros::<T>(elements)?,
            };
            let (x_view, w_view) = (view::<T>(xs, layout)?, view::<T>(weight, weight_layout)?);
            let b_view = view::<T>(bias, bias_layout)?;
            let z_view = residual.map(|(storage, layout)| view::<T>(storage, layout)).transpose()?;
            // Input, residual and bias go to cuDNN by address (one type for the three, as cudarc's
            // call wants), the residual being the output itself when there is none.
            let (x_ptr, _x_read) = x_view.device_ptr(&stream);
            let (b_ptr, _b_read) = b_view.device_ptr(&stream);
            let (z_ptr, _z_read, z_len) = match &z_view {
                Some(z) => {
                    let (ptr, read) = z.device_ptr(&stream);
                    (ptr, Some(read), z.len())
                }
                None => (ys.device_ptr(&stream).0, None, ys.len()),
            };
            let raw = |ptr, len| Raw::<T> { ptr, len, stream: stream.clone(), marker: PhantomData };
            let (x_raw, b_raw, z_raw) = (raw(x_ptr, x_view.len()), raw(b_ptr, b_view.len()), raw(z_ptr, z_len));
            let alpha2 = if residual.is_some() { T::one() } else { T::zero() };
            // SAFETY: the descriptors above describe these buffers: contiguous NCHW input, output
            // and residual of the geometry's shapes, the (O, C, K, K) kernel and O biases, all of
            // type T, on this device's stream; the workspace has the bytes cuDNN asked for.
            unsafe {
                op.launch(algorithm, workspace.as_mut(), (T::one(), alpha2), &x_raw, &w_view, &z_raw, &b_raw, &mut ys)
            }
            .map_err(|e| self.refusal(e))?;
            Ok(CudaStorage::wrap_cuda_slice(ys, device.clone()))
        }

        /// cuDNN's error, remembering a refusal (a configuration it does not support).
        fn refusal(&self, error: CudnnError) -> candle_core::Error {
            use sys::cudnnStatus_t::{CUDNN_STATUS_BAD_PARAM, CUDNN_STATUS_NOT_SUPPORTED};
            if matches!(error.0, CUDNN_STATUS_NOT_SUPPORTED | CUDNN_STATUS_BAD_PARAM)
                && !self.conv.refused.swap(true, Ordering::Relaxed)
            {
                tracing::warn!(error = ?error.0, "cuDNN refused a fused convolution; it runs as Candle's");
            }
            candle_core::Error::wrap(error)
        }
    }

    /// One convolution call's layouts.
    #[derive(Clone, Copy)]
    struct Args<'a> {
        geometry: Geometry,
        layout: &'a Layout,
        weight_layout: &'a Layout,
        bias_layout: &'a Layout,
        residual: Option<(&'a CudaStorage, &'a Layout)>,
    }

    /// A device buffer by its address. cudarc's fused call takes input, residual and bias as one
    /// type, and without a residual the residual is the output, which a typed view cannot be
    /// while the output is borrowed to be written.
    struct Raw<T> {
        ptr: driver::sys::CUdeviceptr,
        len: usize,
        stream: Arc<CudaStream>,
        marker: PhantomData<T>,
    }

    impl<T> DeviceSlice<T> for Raw<T> {
        fn len(&self) -> usize {
            self.len
        }

        fn stream(&self) -> &Arc<CudaStream> {
            &self.stream
        }
    }

    impl<T> DevicePtr<T> for Raw<T> {
        // Everything here runs on Candle's one stream, in order: nothing to wait for or record.
        fn device_ptr<'a>(&'a self, _: &'a CudaStream) -> (driver::sys::CUdeviceptr, SyncOnDrop<'a>) {
            (self.ptr, SyncOnDrop::Sync(None))
        }
    }

    pub(super) fn max_pool(xs: &Tensor, window: Window) -> Result<Tensor> {
        xs.contiguous()?.apply_op1_no_bwd(&MaxPool(window))
    }

    struct MaxPool(Window);

    impl CustomOp1 for MaxPool {
        fn name(&self) -> &'static str {
            "cudnn-max-pool"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("cuDNN's max-pool runs on a GPU")
        }

        fn cuda_fwd(&self, xs: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
            let input = dims4(layout, "cuDNN max-pool input")?;
            let Window { size, stride, padding } = self.0;
            let [n, c, h, w] = input;
            let out = |d: usize| (d + 2 * padding - size) / stride + 1;
            let output = [n, c, out(h), out(w)];
            let slice = match xs.dtype() {
                DType::F32 => self.launch::<f32>(xs, layout, input, output)?,
                DType::F16 => self.launch::<half::f16>(xs, layout, input, output)?,
                DType::BF16 => self.launch::<half::bf16>(xs, layout, input, output)?,
                dtype => candle_core::bail!("cuDNN max-pool of {dtype:?}"),
            };
            Ok((slice, Shape::from(output.to_vec())))
        }
    }

    impl MaxPool {
        fn launch<T>(
            &self,
            xs: &CudaStorage,
            layout: &Layout,
            input: [usize; 4],
            output: [usize; 4],
        ) -> Result<CudaStorage>
        where
            T: CudaDType + CudnnDataType + DeviceRepr + ValidAsZeroBits + WithDType,
        {
            let device = xs.device();
            let cudnn = handle(device)?;
            let Window { size, stride, padding } = self.0;
            let (size, stride, padding) = (size as i32, stride as i32, padding as i32);
            let w_err = candle_core::Error::wrap;
            let pooling = cudnn
                .create_poolingnd::<f32>(
                    &[size, size],
                    &[padding, padding],
                    &[stride, stride],
                    sys::cudnnPoolingMode_t::CUDNN_POOLING_MAX,
                    sys::cudnnNanPropagation_t::CUDNN_PROPAGATE_NAN,
                )
                .map_err(w_err)?;
            let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
            let x_desc: TensorDescriptor<T> = cudnn.create_4d_tensor(nchw, as_i32(input)).map_err(w_err)?;
            let y_desc: TensorDescriptor<T> = cudnn.create_4d_tensor(nchw, as_i32(output)).map_err(w_err)?;
            // SAFETY: every output element is written by the pooling.
            let mut ys = unsafe { device.alloc::<T>(output.iter().product())? };
            let x_view = view::<T>(xs, layout)?;
            let op = PoolingForward { pooling: &pooling, x: &x_desc, y: &y_desc };
            // SAFETY: the descriptors describe the contiguous NCHW input and output of type T.
            unsafe { op.launch((T::one(), T::zero()), &x_view, &mut ys) }.map_err(w_err)?;
            Ok(CudaStorage::wrap_cuda_slice(ys, device.clone()))
        }
    }
}
