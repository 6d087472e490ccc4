//! Convolutions and max-pools on an NVIDIA GPU through cuDNN, run as PyTorch runs them.
//!
//! Candle's own cuDNN convolution (candle-core's `cudnn` feature) asks cuDNN's heuristics for an
//! algorithm and allocates a zeroed workspace on every call, and is a bare convolution: the bias,
//! residual and ReLU after it are a kernel and a fresh tensor each, most of the time at small
//! batches (docs/benchmarks.md has the figures; `sluice bench cuda --candle-convolutions` times
//! it). It also leaves cuDNN's math at its default, which lets f32 convolutions run on TF32 tensor
//! cores (7.9e-4 from the CPU's f32 outputs on ResNet-18, over f32's 1e-4). Here a convolution is one
//! `cudnnConvolutionBiasActivationForward` call, `relu(conv(x) + bias + residual)`, with the math
//! the model's precision asks for (FMA for f32; tensor cores for tf32, f16 and bf16), and its
//! algorithm chosen once per shape and device (cuDNN's heuristics, as PyTorch's default). A shape
//! cuDNN does not support that call for says so once in the log and runs as Candle's convolution.

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
        Ok(Some(Self { inner: gpu::Conv::new(weight, bias, window)? }))
    }

    /// `relu(conv(xs) + bias + residual)` (no ReLU unless `relu`, no residual unless given), or
    /// None where cuDNN does not support the call for this shape: the caller runs Candle's
    /// convolution then.
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
        pub(super) fn new(_: &Tensor, _: &Tensor, _: Window) -> Result<Self> {
            candle_core::bail!("cuDNN convolutions need a build with `cuda`")
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
    use std::sync::{Arc, LazyLock, Mutex, PoisonError};

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
    }

    impl Conv {
        pub(super) fn new(weight: &Tensor, bias: &Tensor, window: Window) -> Result<Self> {
            let (out_channels, _, height, width) = weight.dims4()?;
            if height != window.size || width != window.size {
                candle_core::bail!("cuDNN convolution: a {0}×{0} kernel, not {height}×{width}", window.size);
            }
            if bias.elem_count() != out_channels {
                candle_core::bail!("cuDNN convolution: {} biases for {out_channels} channels", bias.elem_count());
            }
            let tensor_cores = weight.dtype() != DType::F32 || candle_core::cuda::gemm_reduced_precision_f32();
            Ok(Self { weight: weight.contiguous()?, bias: bias.flatten_all()?.contiguous()?, window, tensor_cores })
        }

        pub(super) fn forward(&self, xs: &Tensor, residual: Option<&Tensor>, relu: bool) -> Result<Option<Tensor>> {
            let candle_core::Device::Cuda(device) = xs.device() else {
                candle_core::bail!("cuDNN convolution of a tensor on {:?}", xs.device());
            };
            let (n, c, h, w) = xs.dims4()?;
            let (o, kernel_c, k, _) = self.weight.dims4()?;
            let key = PlanKey {
                device: device.id(),
                geometry: Geometry { input: [n, c, h, w], kernel: [o, kernel_c, k, k], window: self.window },
                dtype: xs.dtype(),
                tensor_cores: self.tensor_cores,
                relu,
            };
            if matches!(plan(&key), Some(Plan::Unsupported)) {
                return Ok(None);
            }
            let op = Fused { conv: self, key };
            let xs = xs.contiguous()?;
            let out = match residual {
                Some(residual) => xs.apply_op2_no_bwd(&residual.contiguous()?, &op),
                None => xs.apply_op1_no_bwd(&op),
            };
            match out {
                Err(_) if matches!(plan(&key), Some(Plan::Unsupported)) => Ok(None),
                out => out.map(Some),
            }
        }
    }

    /// One call of [`Conv`]: the op Candle runs over the input (and the residual).
    struct Fused<'a> {
        conv: &'a Conv,
        key: PlanKey,
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
        window: Window,
    }

    impl Geometry {
        fn output(&self) -> [usize; 4] {
            let [n, _, h, w] = self.input;
            [n, self.kernel[0], self.window.out(h), self.window.out(w)]
        }
    }

    /// What a convolution's algorithm is chosen by: the same device, geometry, types and math
    /// choose the same one.
    #[derive(Clone, Copy, PartialEq, Eq, Hash)]
    struct PlanKey {
        device: DeviceId,
        geometry: Geometry,
        dtype: DType,
        tensor_cores: bool,
        relu: bool,
    }

    /// How a convolution runs, worked out on its first call.
    #[derive(Clone, Copy)]
    enum Plan {
        Fused {
            algorithm: sys::cudnnConvolutionFwdAlgo_t,
            workspace_bytes: usize,
        },
        /// cuDNN does not support the fused call here: Candle's convolution runs instead.
        Unsupported,
    }

    /// Every convolution's plan, for the whole process (the blocking threads that run batches come
    /// and go).
    static PLANS: LazyLock<Mutex<HashMap<PlanKey, Plan>>> = LazyLock::new(Default::default);

    fn plan(key: &PlanKey) -> Option<Plan> {
        PLANS.lock().unwrap_or_else(PoisonError::into_inner).get(key).copied()
    }

    fn set_plan(key: PlanKey, plan: Plan) {
        PLANS.lock().unwrap_or_else(PoisonError::into_inner).insert(key, plan);
    }

    thread_local! {
        // cuDNN handles are neither Send nor Sync: one per thread and device (as Candle keeps its own).
        static HANDLES: RefCell<HashMap<DeviceId, Arc<Cudnn>>> = RefCell::new(HashMap::new());
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

    fn as_i32(dims: [usize; 4]) -> Result<[i32; 4]> {
        let mut out = [0; 4];
        for (to, from) in out.iter_mut().zip(dims) {
            *to = i32::try_from(from).map_err(candle_core::Error::wrap)?;
        }
        Ok(out)
    }

    /// A 4-D NCHW descriptor of `dims`.
    fn descriptor<T: Element>(cudnn: &Arc<Cudnn>, dims: [usize; 4]) -> Result<TensorDescriptor<T>> {
        cudnn.create_4d_tensor(NCHW, as_i32(dims)?).map_err(candle_core::Error::wrap)
    }

    const NCHW: sys::cudnnTensorFormat_t = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;

    /// The element types cuDNN and Candle's CUDA storage both take (f32, f16, bf16).
    trait Element: CudaDType + CudnnDataType + DeviceRepr + ValidAsZeroBits + WithDType {}

    impl<T: CudaDType + CudnnDataType + DeviceRepr + ValidAsZeroBits + WithDType> Element for T {}

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
            let geometry = self.key.geometry;
            if dims4(layout, "cuDNN convolution input")? != geometry.input {
                candle_core::bail!("cuDNN convolution: input {:?} for {:?}", layout.shape(), geometry.input);
            }
            let output = geometry.output();
            if let Some((_, residual_layout)) = residual
                && dims4(residual_layout, "cuDNN convolution residual")? != output
            {
                candle_core::bail!("residual {:?} for an output {output:?}", residual_layout.shape());
            }
            let args = Args { layout, weight_layout, bias_layout, residual };
            let slice = match xs.dtype() {
                DType::F32 => self.launch::<f32>(xs, weight, bias, &args)?,
                DType::F16 => self.launch::<half::f16>(xs, weight, bias, &args)?,
                DType::BF16 => self.launch::<half::bf16>(xs, weight, bias, &args)?,
                dtype => candle_core::bail!("cuDNN convolution of {dtype:?}"),
            };
            Ok((slice, Shape::from(output.to_vec())))
        }

        fn launch<T: Element>(
            &self,
            xs: &CudaStorage,
            weight: &CudaStorage,
            bias: &CudaStorage,
            args: &Args,
        ) -> Result<CudaStorage> {
            let device = xs.device();
            let stream = device.cuda_stream();
            let cudnn = handle(device)?;
            let Args { layout, weight_layout, bias_layout, residual } = *args;
            let PlanKey { geometry, tensor_cores, relu, .. } = self.key;
            let output = geometry.output();
            let [p, s] = [geometry.window.padding, geometry.window.stride].map(|v| v as i32);
            let w_err = candle_core::Error::wrap;
            let mut conv: ConvDescriptor<f32> = cudnn
                .create_conv2d([p, p], [s, s], [1, 1], sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION)
                .map_err(w_err)?;
            let math = if tensor_cores {
                sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
            } else {
                sys::cudnnMathType_t::CUDNN_FMA_MATH
            };
            conv.set_math_type(math).map_err(w_err)?;
            let mode = if relu {
                sys::cudnnActivationMode_t::CUDNN_ACTIVATION_RELU
            } else {
                sys::cudnnActivationMode_t::CUDNN_ACTIVATION_IDENTITY
            };
            let activation: ActivationDescriptor<f32> = cudnn
                .create_activation(mode, sys::cudnnNanPropagation_t::CUDNN_NOT_PROPAGATE_NAN, 0.0)
                .map_err(w_err)?;
            let x_desc = descriptor::<T>(&cudnn, geometry.input)?;
            let w_desc: FilterDescriptor<T> = cudnn.create_4d_filter(NCHW, as_i32(geometry.kernel)?).map_err(w_err)?;
            let y_desc = descriptor::<T>(&cudnn, output)?;
            let b_desc = descriptor::<T>(&cudnn, [1, output[1], 1, 1])?;
            let op = ConvBiasActivationForward {
                conv: &conv,
                act: &activation,
                x: &x_desc,
                w: &w_desc,
                z: &y_desc,
                bias: &b_desc,
                y: &y_desc,
            };
            let (algorithm, workspace_bytes) = match plan(&self.key) {
                Some(Plan::Fused { algorithm, workspace_bytes }) => (algorithm, workspace_bytes),
                Some(Plan::Unsupported) => candle_core::bail!("cuDNN does not support this fused convolution"),
                None => {
                    // With no activation the fused call runs one algorithm only (cuDNN's rule).
                    let algorithm = if relu {
                        op.pick_algorithm().map_err(|e| self.unsupported(e))?
                    } else {
                        sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM
                    };
                    let workspace_bytes = op.get_workspace_size(algorithm).map_err(|e| self.unsupported(e))?;
                    set_plan(self.key, Plan::Fused { algorithm, workspace_bytes });
                    (algorithm, workspace_bytes)
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
                // The output's address only: it is written through `ys` below, in the same call.
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
            .map_err(|e| self.unsupported(e))?;
            Ok(CudaStorage::wrap_cuda_slice(ys, device.clone()))
        }

        /// cuDNN's error; where it does not support the fused call for this shape, the plan says
        /// so, and Candle's convolution runs it from now on.
        fn unsupported(&self, error: CudnnError) -> candle_core::Error {
            if error.0 == sys::cudnnStatus_t::CUDNN_STATUS_NOT_SUPPORTED {
                let f32 = self.key.dtype == DType::F32 && !self.key.tensor_cores;
                tracing::warn!(
                    shape = ?self.key.geometry.input,
                    "cuDNN does not support a fused convolution here; it runs as Candle's{}",
                    if f32 { ", at cuDNN's default math (TF32 on Ampere and later GPUs)" } else { "" }
                );
                set_plan(self.key, Plan::Unsupported);
            }
            candle_core::Error::wrap(error)
        }
    }

    /// One convolution call's layouts.
    #[derive(Clone, Copy)]
    struct Args<'a> {
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
        // Candle runs a device's work on the calling thread's stream (CUDA's per-thread default
        // stream) and a forward pass on one thread, so everything here is in stream order: nothing
        // to wait for or record. The caller holds the typed views' own guards across the launch.
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
            let [n, c, h, w] = input;
            let output = [n, c, self.0.out(h), self.0.out(w)];
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
        fn launch<T: Element>(
            &self,
            xs: &CudaStorage,
            layout: &Layout,
            input: [usize; 4],
            output: [usize; 4],
        ) -> Result<CudaStorage> {
            let device = xs.device();
            let cudnn = handle(device)?;
            let Window { size, stride, padding } = self.0;
            let [size, stride, padding] = [size, stride, padding].map(|v| v as i32);
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
            let (x_desc, y_desc) = (descriptor::<T>(&cudnn, input)?, descriptor::<T>(&cudnn, output)?);
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
