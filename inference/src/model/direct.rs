//! The digits CNN's forward pass computed directly on x86-64 CPUs with AVX2 and FMA, one Candle
//! op: 3×3 convolution → ReLU → 3×3 convolution → ReLU → 2×2 max-pool, image by image with each
//! image's activations channel last (HWC) with a zero border (a few KiB that stay in the core's L1
//! cache), then the two dense layers over the batch. The first convolution, over a single input
//! channel, reads its image's patches as a dense layer reads a row. On images of even sides (the
//! digits' 8×8) the second runs by Winograd's F(2×2, 3×3), as ResNet-18's do (`winograd.rs`):
//! 16 products of 16 input channels a tile instead of 9 taps × 16 channels a position, half the
//! multiplications (those of the zero border included), each product a dense layer over the
//! tiles of a few images, and a tile's 2×2 outputs are the max-pool's window.
//!
//! Why our own kernel: Candle has no direct convolution, and its im2col + matrix product
//! (`conv.rs`) spends on laying out and packing 8×8 images what it saves on multiplying them:
//! gemm's kernels ran at about a third of the cores' peak, ONNX Runtime's direct convolutions at
//! about two thirds (docs/benchmarks.md). Candle's CPU matmul also reads /proc/cpuinfo on every
//! call (`num_cpus::get_physical`), a tenth of this model's time. Here eight output channels make
//! a vector; a block of 2 output vectors × 6 positions (12 accumulators) takes, for every tap and
//! input channel, its 2 weight vectors and each position's input value broadcast once (the top
//! and bottom rows' window rows that lie in the zero border are skipped). A dense layer is the
//! same block over images instead of positions, with one tap. SIMD through `pulp`
//! (gemm's own): safe intrinsics, the CPU's features checked at run time.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use super::conv::values;
use super::winograd::transformed_kernel;

/// Output channels a vector.
const LANES: usize = 8;

/// Images whose tiles the second convolution's Winograd products take at once: each product's
/// weights (2 KiB) are then read once for the group's tiles, not once an image (16 products,
/// 32 KiB in all, which with the image's tiles did not fit the L1 cache).
const GROUP: usize = 4;

/// Values between one plane of V (or M) and the next beyond the plane's own: a cache line.
const SKEW: usize = 16;

/// One layer's weights laid out for the kernel, output channels padded to vectors of 8 with
/// zeros, and what follows the products.
struct Layer {
    /// (output block, tap, input channel, vector in the block): a block's weight vectors for one
    /// tap and input channel lie together.
    kernel: Vec<[f32; LANES]>,
    bias: Vec<[f32; LANES]>,
    /// The runs of contiguous input values a position's products read, `run` values each: a
    /// 3×3 convolution reading a bordered image reads its window's 3 rows (3 taps × C channels
    /// each); a dense layer, or a convolution reading patches, one row.
    runs: usize,
    run: usize,
    in_channels: usize,
    out_channels: usize,
    /// ⌈out_channels / 8⌉.
    out_vectors: usize,
    /// Output vectors a block computes: 2 where they divide `out_vectors`, else 1.
    block: usize,
    relu: bool,
}

impl Layer {
    /// `weight` holds (O, C, taps) values in that order; `bias`, O of them. The kernel takes the
    /// inputs in (tap, channel) order, cut into `runs`.
    fn new(
        weight: &[f32],
        bias: &[f32],
        (out_channels, in_channels, taps): (usize, usize, usize),
        runs: usize,
        relu: bool,
    ) -> Self {
        assert_eq!(weight.len(), out_channels * in_channels * taps);
        assert_eq!(bias.len(), out_channels);
        let out_vectors = out_channels.div_ceil(LANES);
        let block = if out_vectors % 2 == 0 { 2 } else { 1 };
        let value = |o: usize, c: usize, tap: usize| {
            if o < out_channels { weight[(o * in_channels + c) * taps + tap] } else { 0.0 }
        };
        let mut kernel = Vec::with_capacity(out_vectors * taps * in_channels);
        for first in (0..out_vectors).step_by(block) {
            for tap in 0..taps {
                for c in 0..in_channels {
                    for v in first..first + block {
                        kernel.push(std::array::from_fn(|lane| value(v * LANES + lane, c, tap)));
                    }
                }
            }
        }
        let bias = (0..out_vectors)
            .map(|v| std::array::from_fn(|lane| bias.get(v * LANES + lane).copied().unwrap_or(0.0)))
            .collect();
        let run = taps * in_channels / runs;
        Self { kernel, bias, runs, run, in_channels, out_channels, out_vectors, block, relu }
    }

    /// Values a row of this layer's output takes (output channels padded to vectors).
    fn width(&self) -> usize {
        self.out_vectors * LANES
    }
}

/// The digits CNN on the CPU as one op: (N, C, H, W) images in, (N, classes) logits out.
pub(crate) struct DirectDigits {
    conv1: Layer,
    conv2: Layer,
    /// The second convolution by Winograd's F(2×2, 3×3) for images of even sides: its 16
    /// products, U[ξ·4 + ν] against the tiles' V[ξ·4 + ν], each a dense layer over the tiles
    /// with neither bias nor ReLU (those, and the max-pool, follow the output transform).
    tiles: Vec<Layer>,
    fc1: Layer,
    fc2: Layer,
    #[cfg(target_arch = "x86_64")]
    simd: pulp::x86::V3,
}

/// A layer's weight and bias as Candle holds them.
pub(crate) type Weights<'a> = (&'a Tensor, Option<&'a Tensor>);

impl DirectDigits {
    /// The op for the network's weights, where the CPU has AVX2 and FMA and the shapes fit: 3×3
    /// convolutions, output channels in eights, `fc1` taking the pooled values of the second
    /// convolution and `fc2` the outputs of `fc1`.
    pub(crate) fn new(convs: [Weights; 2], fcs: [Weights; 2], (height, width): (usize, usize)) -> Result<Option<Self>> {
        #[cfg(target_arch = "x86_64")]
        {
            let Some(simd) = pulp::x86::V3::try_new() else { return Ok(None) };
            let [conv1, conv2] = convs;
            let tiles = tile_products(conv2.0)?;
            let (Some(conv1), Some(conv2)) = (conv(conv1, Reads::Patches)?, conv(conv2, Reads::Window)?) else {
                return Ok(None);
            };
            let cells = (height / 2) * (width / 2);
            if conv2.in_channels != conv1.out_channels || conv2.out_channels % LANES != 0 {
                return Ok(None);
            }
            let [fc1, fc2] = fcs;
            let fc1 = dense(channel_last(fc1.0, conv2.out_channels, cells)?, fc1.1, true)?;
            let fc2 = dense(fc2.0.clone(), fc2.1, false)?;
            let fits = fc1.in_channels == cells * conv2.out_channels && fc2.in_channels == fc1.out_channels;
            Ok(fits.then_some(Self { conv1, conv2, tiles, fc1, fc2, simd }))
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (convs, fcs, height, width);
            Ok(None)
        }
    }
}

fn f32s(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

fn bias(bias: Option<&Tensor>, out_channels: usize) -> Result<Vec<f32>> {
    bias.map(f32s).unwrap_or_else(|| Ok(vec![0.0; out_channels]))
}

/// How a convolution reads its input.
enum Reads {
    /// A pass per row of its 3×3 window over an image with a zero border, the row's three taps'
    /// channels side by side.
    Window,
    /// Its patches laid out first, (channel, tap) a position, as a dense layer reads a row: for
    /// an input of a channel or two, whose window rows would be a handful of values each.
    Patches,
}

/// A 3×3 convolution with its ReLU; `None` unless its output channels come in eights.
fn conv((weight, b): Weights, reads: Reads) -> Result<Option<Layer>> {
    let (o, c, kh, kw) = weight.dims4()?;
    if (kh, kw) != (3, 3) || o % LANES != 0 {
        return Ok(None);
    }
    let (shape, runs) = match reads {
        Reads::Window => ((o, c, 9), 3),
        Reads::Patches => ((o, c * 9, 1), 1),
    };
    Ok(Some(Layer::new(&f32s(weight)?, &bias(b, o)?, shape, runs, true)))
}

/// F(2×2, 3×3)'s 16 products for a 3×3 convolution's `weight` (O, C, 3, 3): U[ξ·4 + ν], (O, C),
/// as dense layers.
fn tile_products(weight: &Tensor) -> Result<Vec<Layer>> {
    let (o, c, _, _) = weight.dims4()?;
    let u = transformed_kernel(&f32s(weight)?, o * c);
    Ok(u.chunks_exact(o * c).map(|u| Layer::new(u, &vec![0.0; o], (o, c, 1), 1, false)).collect())
}

fn dense(weight: Tensor, b: Option<&Tensor>, relu: bool) -> Result<Layer> {
    let (o, c) = weight.dims2()?;
    Ok(Layer::new(&f32s(&weight)?, &bias(b, o)?, (o, c, 1), 1, relu))
}

/// `weight` (out, channels·cells) with its columns in NCHW flatten order (channel, cell), as
/// trained, reordered to the op's pooled values' (cell, channel).
fn channel_last(weight: &Tensor, channels: usize, cells: usize) -> Result<Tensor> {
    let (out, columns) = weight.dims2()?;
    if columns != channels * cells {
        candle_core::bail!("fc1 takes {columns} values, the pooling gives {}", channels * cells);
    }
    weight.reshape((out, channels, cells))?.transpose(1, 2)?.reshape((out, columns))?.contiguous()
}

impl CustomOp1 for DirectDigits {
    fn name(&self) -> &'static str {
        "direct-digits"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let input = values(storage, layout, "direct-digits")?;
        let &[n, c, h, w] = layout.dims() else { candle_core::bail!("direct-digits takes a 4-D tensor") };
        if 9 * c != self.conv1.in_channels || (h / 2) * (w / 2) * self.conv2.out_channels != self.fc1.in_channels {
            candle_core::bail!("direct-digits: ({c}, {h}, {w}) images do not fit the network's weights");
        }
        let classes = self.fc2.out_channels;
        let mut logits = vec![0.0f32; n * classes];
        #[cfg(target_arch = "x86_64")]
        {
            // A chunk of the batch a task, at least one a thread, written where its logits lie.
            let chunk = super::digits_cnn::chunk(n);
            let run = &|(logits, input): (&mut [f32], &[f32])| {
                let dims = (logits.len() / classes, c, h, w);
                self.simd.vectorize(kernel::Forward { net: self, input, dims, logits });
            };
            // The calling thread takes the first chunk itself and hands the rest to the pool. From
            // outside the pool (the inference stage's thread, the bench's), a parallel loop
            // would hand every chunk over and sleep until woken: for a batch of 8, two chunks of
            // about 30 µs each, that hand-off both ways was a third of the time (model alone,
            // two threads, batch 8: best 185k → 240k img/s, median 170k → 199k).
            rayon::in_place_scope(|scope| {
                let mut chunks = logits.chunks_mut(chunk * classes).zip(input.chunks(chunk * c * h * w));
                let first = chunks.next();
                for piece in chunks {
                    scope.spawn(move |_| run(piece));
                }
                if let Some(piece) = first {
                    run(piece);
                }
            });
        }
        Ok((CpuStorage::F32(logits), Shape::from((n, classes))))
    }
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use std::ops::Range;

    use pulp::f32x8;
    use pulp::x86::V3;

    use super::{DirectDigits, GROUP, LANES, Layer, SKEW};
    use crate::model::product::{keep_operand, take_operand};

    /// Accumulators a block holds in registers: of AVX2's 16, the rest hold the block's weight
    /// vectors (up to 2) and an input value broadcast. (Blocks of 4 vectors × 3 positions needed
    /// 17 and spilled one accumulator to the stack on every product.)
    const ACCUMULATORS: usize = 12;
    /// Accumulators of the block that takes the positions left over.
    const TAIL: usize = 8;

    /// The forward pass, handed to [`V3::vectorize`], which compiles it with AVX2 and FMA (a
    /// closure would not be inlined there, and every intrinsic would be a call).
    pub(super) struct Forward<'a> {
        pub net: &'a DirectDigits,
        pub input: &'a [f32],
        pub dims: (usize, usize, usize, usize),
        pub logits: &'a mut [f32],
    }

    impl pulp::NullaryFnOnce for Forward<'_> {
        type Output = ();

        #[inline(always)]
        fn call(self) {
            let Self { net, input, dims, logits } = self;
            net.forward(input, dims, logits);
        }
    }

    /// Where a layer reads an output position's inputs.
    trait Inputs {
        /// The start of position `p`'s inputs for the first tap.
        fn corner(&self, p: usize) -> usize;
        /// How far a run of inputs lies from the first.
        fn shift(&self, run: usize) -> usize;
    }

    /// Where a layer writes an output position's values.
    trait Outputs {
        fn start(&self, p: usize) -> usize;
    }

    /// A 3×3 convolution's inputs: an (h+2, w+2, channels) image with a zero border.
    struct Bordered {
        w: usize,
        channels: usize,
    }

    impl Inputs for Bordered {
        #[inline(always)]
        fn corner(&self, p: usize) -> usize {
            (p / self.w * (self.w + 2) + p % self.w) * self.channels
        }

        /// A run is a row of the window: 3 taps' channels side by side.
        #[inline(always)]
        fn shift(&self, run: usize) -> usize {
            run * (self.w + 2) * self.channels
        }
    }

    /// A convolution's outputs on a (h, w) image, `width` values a position, position (y, x)
    /// at `origin + y·row + x`: the interior of the next convolution's bordered input, or a
    /// plain (h, w, width) image.
    struct Grid {
        w: usize,
        width: usize,
        origin: usize,
        row: usize,
    }

    impl Outputs for Grid {
        #[inline(always)]
        fn start(&self, p: usize) -> usize {
            (self.origin + p / self.w * self.row + p % self.w) * self.width
        }
    }

    /// Positions one after another, `stride` values apart: a batch's rows in a dense layer, or
    /// an image's patches.
    struct Rows {
        stride: usize,
    }

    impl Inputs for Rows {
        #[inline(always)]
        fn corner(&self, p: usize) -> usize {
            p * self.stride
        }

        #[inline(always)]
        fn shift(&self, _run: usize) -> usize {
            0
        }
    }

    impl Outputs for Rows {
        #[inline(always)]
        fn start(&self, p: usize) -> usize {
            p * self.stride
        }
    }

    impl DirectDigits {
        #[inline(always)]
        fn forward(&self, input: &[f32], (n, c, h, w): (usize, usize, usize, usize), logits: &mut [f32]) {
            let simd = self.simd;
            // The first convolution reads its image's patches, (position, channel, tap) — as
            // a dense layer, with no pass per tap over a channel or two. The second reads the
            // first's output in an image with a zero border: the border is zeroed here once and
            // never written.
            let mut patches = vec![0.0f32; h * w * c * 9];
            let mut framed = vec![0.0f32; c * (h + 2) * (w + 2)];
            let mut hidden = vec![0.0f32; (h + 2) * (w + 2) * self.conv1.width()];
            let pooled_width = self.fc1.in_channels;
            let mut pooled = vec![0.0f32; n * pooled_width];
            let inside = Grid { w, width: self.conv1.width(), origin: w + 3, row: w + 2 };
            let (patch_rows, patch_spans) = (Rows { stride: 9 * c }, self.conv1.all(h * w));
            // Images of even sides take the second convolution by Winograd's F(2×2, 3×3): a
            // tile's 2×2 outputs are then the max-pool's window.
            if h % 2 == 0 && w % 2 == 0 {
                let tiles = (h / 2) * (w / 2);
                let (in_width, out_width) = (self.conv1.width(), self.conv2.width());
                // The products over the tiles of a group of images at once.
                let group = GROUP.min(n);
                // The 16 planes of V and of M a cache line further apart than their values
                // need: at a power-of-two distance, a tile's 16 values fell in one set of the
                // L1 cache and evicted each other.
                let (v_plane, m_plane) = (group * tiles * in_width + SKEW, group * tiles * out_width + SKEW);
                // Kept on the thread between calls: hundreds of KiB, which a fresh allocation
                // took from the system (and gave back) on every call.
                let mut buffer = take_operand(16 * (v_plane + m_plane));
                {
                    let (v, m) = buffer.split_at_mut(16 * v_plane);
                    let images = input.chunks(group * c * h * w).zip(pooled.chunks_mut(group * pooled_width));
                    for (images, pooled) in images {
                        let count = images.len() / (c * h * w) * tiles;
                        for (i, image) in images.chunks_exact(c * h * w).enumerate() {
                            fill_patches(image, (c, h, w), &mut framed, &mut patches);
                            self.conv1.run(simd, (&patches, &patch_rows), &patch_spans, (&mut hidden, &inside));
                            input_transform(simd, &hidden, (h, w, in_width), (i * tiles, v_plane), v);
                        }
                        let spans = self.tiles[0].all(count);
                        let products = self.tiles.iter().zip(v.chunks_exact(v_plane));
                        for ((layer, v), m) in products.zip(m.chunks_exact_mut(m_plane)) {
                            let (from, to) = (Rows { stride: in_width }, Rows { stride: out_width });
                            layer.run(simd, (v, &from), &spans, (m, &to));
                        }
                        output_transform_pool(simd, m, (count, m_plane, out_width), &self.conv2.bias, pooled);
                    }
                }
                keep_operand(buffer);
            } else {
                let mut last = vec![0.0f32; h * w * self.conv2.width()];
                let plain = Grid { w, width: self.conv2.width(), origin: 0, row: w };
                let bordered = Bordered { w, channels: self.conv1.width() };
                let window_spans = window_spans(h, w);
                for (image, dst) in input.chunks_exact(c * h * w).zip(pooled.chunks_exact_mut(pooled_width)) {
                    fill_patches(image, (c, h, w), &mut framed, &mut patches);
                    self.conv1.run(simd, (&patches, &patch_rows), &patch_spans, (&mut hidden, &inside));
                    self.conv2.run(simd, (&hidden, &bordered), &window_spans, (&mut last, &plain));
                    max_pool(simd, &last, w, self.conv2.out_vectors, dst);
                }
            }
            let mut dense = vec![0.0f32; n * self.fc1.width()];
            let (rows, dense_rows) = (Rows { stride: pooled_width }, Rows { stride: self.fc1.width() });
            self.fc1.run(simd, (&pooled, &rows), &self.fc1.all(n), (&mut dense, &dense_rows));
            let mut out = vec![0.0f32; n * self.fc2.width()];
            let out_rows = Rows { stride: self.fc2.width() };
            self.fc2.run(simd, (&dense, &dense_rows), &self.fc2.all(n), (&mut out, &out_rows));
            let classes = self.fc2.out_channels;
            for (logits, out) in logits.chunks_exact_mut(classes).zip(out.chunks_exact(self.fc2.width())) {
                logits.copy_from_slice(&out[..classes]);
            }
        }
    }

    /// `patches` (h·w positions, c channels, 9 taps) of a (c, h, w) image, 0 outside it, by way
    /// of `framed`: the image's planes with a zero border, (c, h+2, w+2), the border zeroed by
    /// the caller. (Patches taken from the image itself, each tap checked against its edges,
    /// took a twentieth of the model's time.)
    #[inline(always)]
    fn fill_patches(image: &[f32], (c, h, w): (usize, usize, usize), framed: &mut [f32], patches: &mut [f32]) {
        let side = w + 2;
        for (plane, framed) in image.chunks_exact(h * w).zip(framed.chunks_exact_mut((h + 2) * side)) {
            for (line, framed) in plane.chunks_exact(w).zip(framed.chunks_exact_mut(side).skip(1)) {
                framed[1..=w].copy_from_slice(line);
            }
        }
        for (y, row) in patches.chunks_exact_mut(9 * c * w).enumerate() {
            for (x, patch) in row.chunks_exact_mut(9 * c).enumerate() {
                for (plane, taps) in framed.chunks_exact((h + 2) * side).zip(patch.chunks_exact_mut(9)) {
                    for (ky, taps) in taps.chunks_exact_mut(3).enumerate() {
                        taps.copy_from_slice(&plane[(y + ky) * side + x..][..3]);
                    }
                }
            }
        }
    }

    /// Output positions whose windows read the same runs of their input: the rest of each
    /// window lies in the zero border, and its products are skipped.
    struct Span {
        positions: Range<usize>,
        runs: Range<usize>,
    }

    /// A 3×3 convolution's spans over an (h, w) image read with a zero border: the top row's
    /// windows start a row down, the bottom row's end a row early — a twelfth of an 8×8 image's
    /// products, all zeros. (The left and right columns' zero taps too, as spans of a column
    /// whose runs start a tap late or end a tap early, made 7% fewer products and ran no
    /// faster: shorter passes, more of them. Measured, not kept.)
    fn window_spans(h: usize, w: usize) -> Vec<Span> {
        let mut spans: Vec<Span> = Vec::new();
        for y in 0..h {
            let runs = usize::from(y == 0)..3 - usize::from(y + 1 == h);
            match spans.last_mut() {
                Some(span) if span.runs == runs => span.positions.end += w,
                _ => spans.push(Span { positions: y * w..(y + 1) * w, runs }),
            }
        }
        spans
    }

    /// Positions a pass of blocks of `p` computes for `count` positions, the leftover ones in
    /// blocks of `t` ending at the last position (see [`Layer::blocks`]).
    fn covered(count: usize, p: usize, t: usize) -> usize {
        let (whole, left) = (count / p * p, count % p);
        match left {
            0 => whole,
            _ if left > t && whole > 0 => whole + p,
            _ => whole + left.div_ceil(t) * t,
        }
    }

    impl Layer {
        /// One span over `positions` positions, reading every run.
        fn all(&self, positions: usize) -> Vec<Span> {
            vec![Span { positions: 0..positions, runs: 0..self.runs }]
        }

        /// The layer at the positions of `spans` of `input` into `out`.
        #[inline(always)]
        fn run(&self, simd: V3, from: (&[f32], &impl Inputs), spans: &[Span], to: (&mut [f32], &impl Outputs)) {
            match self.block {
                2 => self.blocks::<2, { ACCUMULATORS / 2 }, { TAIL / 2 }>(simd, from, spans, to),
                _ => self.blocks::<1, ACCUMULATORS, TAIL>(simd, from, spans, to),
            }
        }

        /// Every output block: `B` vectors of output channels for `P` positions at a time, and
        /// the positions left over in a block that ends at the last position, computing a few
        /// twice (the same values): of `T` positions where that covers them (8 accumulators
        /// still hide the products' latency), else of `P`. A span that blocks of `T` alone
        /// cover with fewer products (an 8×8 image's edge row: 4 + 4, not 6 + 4) takes those.
        /// Blocks of one position, only for fewer than `T` positions in a span, have too few
        /// accumulators: the 4 positions left over of an 8×8 image took a fifth of the time
        /// that way.
        #[inline(always)]
        fn blocks<const B: usize, const P: usize, const T: usize>(
            &self,
            simd: V3,
            from: (&[f32], &impl Inputs),
            spans: &[Span],
            (out, at): (&mut [f32], &impl Outputs),
        ) {
            let per_block = self.runs * self.run * B;
            for (index, kernel) in self.kernel.chunks_exact(per_block).enumerate() {
                let first = index * B;
                for Span { positions, runs } in spans {
                    let (start, end) = (positions.start, positions.end);
                    if positions.len() < T {
                        for p in positions.clone() {
                            self.block::<B, 1>(simd, from, (kernel, runs), first, p, (&mut *out, at));
                        }
                        continue;
                    }
                    // Blocks of P, the rest in blocks of T; or blocks of T alone where those
                    // compute fewer positions.
                    let whole = match covered(positions.len(), T, T) < covered(positions.len(), P, T) {
                        true => start,
                        false => start + positions.len() / P * P,
                    };
                    for p in (start..whole).step_by(P) {
                        self.block::<B, P>(simd, from, (kernel, runs), first, p, (&mut *out, at));
                    }
                    let left = end - whole;
                    if left > T && whole > start {
                        self.block::<B, P>(simd, from, (kernel, runs), first, end - P, (&mut *out, at));
                    } else if left > 0 {
                        for p in (whole..end - T).step_by(T).chain([end - T]) {
                            self.block::<B, T>(simd, from, (kernel, runs), first, p, (&mut *out, at));
                        }
                    }
                }
            }
        }

        /// Output vectors `first..first + B` at positions `p..p + P`, reading `runs` of their
        /// inputs, then bias and ReLU.
        #[inline(always)]
        fn block<const B: usize, const P: usize>(
            &self,
            simd: V3,
            (input, inputs): (&[f32], &impl Inputs),
            (kernel, runs): (&[[f32; LANES]], &Range<usize>),
            first: usize,
            p: usize,
            (out, outputs): (&mut [f32], &impl Outputs),
        ) {
            let run = self.run;
            let zero = simd.splat_f32x8(0.0);
            let mut acc = [[zero; B]; P];
            // Arrays filled by loops, not `array::from_fn`, which was not inlined here: the
            // products' loop then checked every access and kept its accumulators in memory.
            let mut corners = [0; P];
            for (i, corner) in corners.iter_mut().enumerate() {
                *corner = inputs.corner(p + i);
            }
            let kernel = &kernel[runs.start * run * B..runs.end * run * B];
            for (r, weights) in kernel.chunks_exact(run * B).enumerate() {
                let shift = inputs.shift(runs.start + r);
                let mut xs: [&[f32]; P] = [&[]; P];
                for (xs, &corner) in xs.iter_mut().zip(&corners) {
                    *xs = &input[corner + shift..][..run];
                }
                for (value, weights) in weights.chunks_exact(B).enumerate() {
                    let mut vectors = [zero; B];
                    for (vector, &weights) in vectors.iter_mut().zip(weights) {
                        *vector = pulp::cast(weights);
                    }
                    for (acc, xs) in acc.iter_mut().zip(&xs) {
                        let x = simd.splat_f32x8(xs[value]);
                        for (acc, &weights) in acc.iter_mut().zip(&vectors) {
                            *acc = simd.mul_add_f32x8(weights, x, *acc);
                        }
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                let dst = &mut out[outputs.start(p + i) + first * LANES..][..B * LANES];
                for ((dst, &acc), &bias) in dst.chunks_exact_mut(LANES).zip(acc).zip(&self.bias[first..first + B]) {
                    let value = simd.add_f32x8(acc, pulp::cast(bias));
                    let value = if self.relu { simd.max_f32x8(value, zero) } else { value };
                    dst.copy_from_slice(&pulp::cast::<f32x8, [f32; LANES]>(value));
                }
            }
        }
    }

    /// A vector of 8 values of `values` from `at`.
    #[inline(always)]
    fn load(values: &[f32], at: usize) -> f32x8 {
        pulp::cast::<[f32; LANES], f32x8>(values[at..at + LANES].try_into().expect("LANES values"))
    }

    /// V = Bᵀ·d·B of every 4×4 tile d of a bordered (h+2, w+2, `channels`) image, h and w even,
    /// into `v`, 16 planes `plane` values apart of (tiles, channels), as tiles `first..`: tile
    /// (ty, tx) from row 2ty and column 2tx, its 2×2 outputs at (2ty, 2tx); V[ξ·4 + ν]. Bᵀ's
    /// rows are d0 − d2, d1 + d2, d2 − d1, d1 − d3.
    #[inline(always)]
    fn input_transform(
        simd: V3,
        image: &[f32],
        (h, w, channels): (usize, usize, usize),
        (first, plane): (usize, usize),
        v: &mut [f32],
    ) {
        let (tw, tiles, side) = (w / 2, (h / 2) * (w / 2), w + 2);
        for t in 0..tiles {
            let (y, x) = (t / tw * 2, t % tw * 2);
            for k in (0..channels).step_by(LANES) {
                let mut d = [[simd.splat_f32x8(0.0); 4]; 4];
                for (i, row) in d.iter_mut().enumerate() {
                    for (j, value) in row.iter_mut().enumerate() {
                        *value = load(image, ((y + i) * side + x + j) * channels + k);
                    }
                }
                // Bᵀ·d down each column j, then ·B along each row ξ.
                let mut columns = [[simd.splat_f32x8(0.0); 4]; 4];
                for j in 0..4 {
                    let column = input_rows(simd, [d[0][j], d[1][j], d[2][j], d[3][j]]);
                    for (xi, value) in column.into_iter().enumerate() {
                        columns[xi][j] = value;
                    }
                }
                for (xi, row) in columns.into_iter().enumerate() {
                    for (nu, value) in input_rows(simd, row).into_iter().enumerate() {
                        let at = (xi * 4 + nu) * plane + (first + t) * channels + k;
                        v[at..at + LANES].copy_from_slice(&pulp::cast::<f32x8, [f32; LANES]>(value));
                    }
                }
            }
        }
    }

    /// Bᵀ·d of four vectors (functions, not closures: a closure is not inlined here, and its
    /// intrinsics become calls).
    #[inline(always)]
    fn input_rows(simd: V3, d: [f32x8; 4]) -> [f32x8; 4] {
        [simd.sub_f32x8(d[0], d[2]), simd.add_f32x8(d[1], d[2]), simd.sub_f32x8(d[2], d[1]), simd.sub_f32x8(d[1], d[3])]
    }

    /// Aᵀ·m of four vectors.
    #[inline(always)]
    fn output_rows(simd: V3, m: [f32x8; 4]) -> [f32x8; 2] {
        [simd.add_f32x8(simd.add_f32x8(m[0], m[1]), m[2]), simd.sub_f32x8(simd.sub_f32x8(m[1], m[2]), m[3])]
    }

    /// Y = Aᵀ·M·A of every tile's products `m`, 16 planes `plane` values apart of (tiles, width),
    /// then bias, ReLU and the 2×2 max-pool (a tile's 2×2 outputs are its window) into `out`,
    /// (tiles, width). Aᵀ's rows are m0 + m1 + m2 and m1 − m2 − m3. ReLU(y + bias) grows with y,
    /// so the pool takes the largest y first.
    #[inline(always)]
    fn output_transform_pool(
        simd: V3,
        m: &[f32],
        (tiles, plane, width): (usize, usize, usize),
        bias: &[[f32; LANES]],
        out: &mut [f32],
    ) {
        let zero = simd.splat_f32x8(0.0);
        for t in 0..tiles {
            for (k, &bias) in (0..width).step_by(LANES).zip(bias) {
                // Aᵀ·M down each column ν, then ·A along each of the two rows.
                let (mut top, mut bottom) = ([zero; 4], [zero; 4]);
                for (nu, (top, bottom)) in top.iter_mut().zip(&mut bottom).enumerate() {
                    let mut column = [zero; 4];
                    for (xi, value) in column.iter_mut().enumerate() {
                        *value = load(m, (xi * 4 + nu) * plane + t * width + k);
                    }
                    [*top, *bottom] = output_rows(simd, column);
                }
                let [a, b] = output_rows(simd, top);
                let [c, d] = output_rows(simd, bottom);
                let largest = simd.max_f32x8(simd.max_f32x8(a, b), simd.max_f32x8(c, d));
                let value = simd.max_f32x8(simd.add_f32x8(largest, pulp::cast(bias)), zero);
                out[t * width + k..][..LANES].copy_from_slice(&pulp::cast::<f32x8, [f32; LANES]>(value));
            }
        }
    }

    /// 2×2 max-pool, stride 2, of a plain (h, w, vectors·8) image into `out`, (h/2, w/2,
    /// vectors·8).
    #[inline(always)]
    fn max_pool(simd: V3, image: &[f32], w: usize, vectors: usize, out: &mut [f32]) {
        let channels = vectors * LANES;
        let at = |y: usize, x: usize, v: usize| load(image, (y * w + x) * channels + v * LANES);
        for (cell, dst) in out.chunks_exact_mut(channels).enumerate() {
            let (y, x) = (cell / (w / 2) * 2, cell % (w / 2) * 2);
            for (v, dst) in dst.chunks_exact_mut(LANES).enumerate() {
                let top = simd.max_f32x8(at(y, x, v), at(y, x + 1, v));
                let bottom = simd.max_f32x8(at(y + 1, x, v), at(y + 1, x + 1, v));
                dst.copy_from_slice(&pulp::cast::<f32x8, [f32; LANES]>(simd.max_f32x8(top, bottom)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Module, Tensor};
    use candle_nn::{Conv2d, Conv2dConfig, Linear};

    use super::DirectDigits;

    #[test]
    fn agrees_with_candles_layers() {
        let device = Device::Cpu;
        // The digits CNN's shapes; more input channels, odd sides (the pooling drops the last
        // row and column), output channels in one, two and three vectors (blocks of 2 and 1),
        // dense layers whose outputs do not fill a vector, and positions (pixels, or images in
        // a dense layer) that leave every kind of remainder after the blocks.
        let cases = [
            (1, (16, 32), (8, 8), (64, 10), 7),
            (3, (8, 24), (7, 9), (12, 5), 13),
            (2, (16, 16), (5, 4), (16, 3), 2),
            (1, (32, 8), (3, 3), (9, 17), 1),
            (1, (16, 8), (3, 7), (24, 17), 10),
            // Even sides take the second convolution by Winograd's algorithm: one input
            // vector and three output vectors (blocks of 1), and tiles that leave remainders.
            (2, (8, 24), (6, 4), (12, 5), 5),
            (1, (16, 16), (2, 2), (8, 3), 3),
        ];
        for (channels, (first, second), (h, w), (hidden, classes), n) in cases {
            let randn = |shape: &[usize]| Tensor::randn(0f32, 0.5, shape, &device).unwrap();
            let same = Conv2dConfig { padding: 1, ..Default::default() };
            let conv1 = Conv2d::new(randn(&[first, channels, 3, 3]), Some(randn(&[first])), same);
            let conv2 = Conv2d::new(randn(&[second, first, 3, 3]), Some(randn(&[second])), same);
            let pooled = second * (h / 2) * (w / 2);
            let fc1 = Linear::new(randn(&[hidden, pooled]), Some(randn(&[hidden])));
            let fc2 = Linear::new(randn(&[classes, hidden]), None);
            let xs = randn(&[n, channels, h, w]);
            let want = {
                let xs = conv2.forward(&conv1.forward(&xs).unwrap().relu().unwrap()).unwrap().relu().unwrap();
                let xs = xs.max_pool2d(2).unwrap().flatten_from(1).unwrap();
                fc2.forward(&fc1.forward(&xs).unwrap().relu().unwrap()).unwrap()
            };
            let convs = [(conv1.weight(), conv1.bias()), (conv2.weight(), conv2.bias())];
            let fcs = [(fc1.weight(), fc1.bias()), (fc2.weight(), fc2.bias())];
            let Some(net) = DirectDigits::new(convs, fcs, (h, w)).unwrap() else {
                // Skipped only where the kernel truly cannot run.
                #[cfg(target_arch = "x86_64")]
                assert!(
                    !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")),
                    "the CPU has AVX2 and FMA, yet the direct kernel was not made"
                );
                eprintln!("no AVX2 and FMA on this CPU: the direct kernel does not run here");
                return;
            };
            let got = xs.apply_op1_no_bwd(&net).unwrap();
            assert_eq!(got.dims(), want.dims());
            // Sums of hundreds of products in another order: f32 rounding, relative to the
            // logits' size (tens with these weights). Not under 1: one image's hidden units may
            // all come out negative (1 in 512 with nine), its logits all zero, and 0/0 is NaN.
            let largest = |t: &Tensor| -> f32 { t.abs().unwrap().max_all().unwrap().to_scalar().unwrap() };
            let worst = largest(&(got - &want).unwrap()) / largest(&want).max(1.0);
            assert!(worst < 1e-5, "{channels}→{first}→{second} channels on {h}×{w}: differs by {worst} (relative)");
        }
    }
}
