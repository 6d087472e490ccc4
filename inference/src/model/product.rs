//! Matrix products on the CPU into fresh buffers that are never zeroed: the kernels of the `gemm`
//! crate, which Candle's own matmul runs, called directly. Candle's matmul fills its output with
//! zeros before gemm overwrites every value of it, a pass over memory as large as the product that
//! took 3% of ResNet-18's time on the CPU; and a convolution's operand (im2col's columns,
//! Winograd's transformed tiles) is needed by nothing but its product, so it need not become a
//! tensor of its own.

use std::cell::Cell;

use gemm::Parallelism;

thread_local! {
    /// Each thread's operand buffer, kept from one call to the next (see [`with_operand`]).
    static OPERAND: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// `f` over a buffer of `len` values for a product's operand, kept on this thread from the calls
/// before and not zeroed: its values are whatever an earlier call left, so `f` must write every
/// one before it reads it. A fresh zeroed buffer for each call cost a pass over memory as large as
/// the operand (im2col's columns for ResNet-18's stem are 7 MiB an image). A call nested on the
/// same thread (a task it runs while waiting on its pool) finds the buffer taken and uses one of
/// its own.
pub(crate) fn with_operand<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buffer = take_operand(len);
    let result = f(&mut buffer[..len]);
    keep_operand(buffer);
    result
}

/// This thread's operand buffer, at least `len` values, as [`with_operand`] lends it (for code
/// compiled with features a closure would not carry), to hand back with [`keep_operand`].
pub(crate) fn take_operand(len: usize) -> Vec<f32> {
    let buffer = OPERAND.take();
    if buffer.len() < len { vec![0.0; len] } else { buffer }
}

/// Keeps `buffer` as this thread's operand buffer.
pub(crate) fn keep_operand(buffer: Vec<f32>) {
    OPERAND.set(buffer);
}

/// Sizes of `batch` products of an (m, k) matrix by a (k, n) matrix.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Products {
    pub batch: usize,
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

impl Products {
    /// The products of the row-major matrices in `lhs` and `rhs`, the i-th of each starting at
    /// i·m·k and i·k·n, one after another: (batch, m, n), row-major. The threads are Candle's
    /// (so `--threads` holds here too).
    pub(crate) fn of(self, lhs: &[f32], rhs: &[f32]) -> Vec<f32> {
        let Products { batch, m, k, n } = self;
        assert_eq!(lhs.len(), batch * m * k, "left-hand matrices of {self:?}");
        assert_eq!(rhs.len(), batch * k * n, "right-hand matrices of {self:?}");
        let len = batch * m * n;
        if k == 0 {
            return vec![0.0; len];
        }
        let threads = candle_core::utils::get_num_threads();
        let parallelism = if threads > 1 { Parallelism::Rayon(threads) } else { Parallelism::None };
        let mut out = Vec::<f32>::with_capacity(len);
        let spare = &mut out.spare_capacity_mut()[..len];
        for step in 0..batch {
            let dst = spare[step * m * n..][..m * n].as_mut_ptr().cast::<f32>();
            let (lhs, rhs) = (&lhs[step * m * k..][..m * k], &rhs[step * k * n..][..k * n]);
            // SAFETY: gemm reads m·k values of `lhs` and k·n of `rhs` in row-major order (row
            // strides k and n, column stride 1), which the slices hold, and writes the m·n values
            // of `dst`, which lie inside `out`'s capacity; with `read_dst` false it never reads
            // them, so they may be uninitialised.
            #[allow(unsafe_code)]
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    dst,
                    1,
                    n as isize,
                    false,
                    lhs.as_ptr(),
                    1,
                    k as isize,
                    rhs.as_ptr(),
                    1,
                    n as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism,
                )
            };
        }
        // SAFETY: the loop above wrote all `len` values (every product's m·n).
        #[allow(unsafe_code)]
        unsafe {
            out.set_len(len)
        };
        out
    }
}

/// Fills this thread's operand buffer with NaN, so that a value a test's next convolution reads
/// from it without writing it first shows in the result.
#[cfg(test)]
pub(crate) fn poison_operand() {
    with_operand(1 << 20, |buffer| buffer.fill(f32::NAN));
}

#[cfg(test)]
mod tests {
    use super::Products;

    #[test]
    fn agrees_with_the_textbook_product() {
        for (batch, m, k, n) in [(1, 3, 4, 5), (16, 7, 9, 33), (2, 64, 1, 3), (3, 2, 0, 4), (2, 0, 3, 2)] {
            let lhs: Vec<f32> = (0..batch * m * k).map(|i| (i % 7) as f32 - 3.0).collect();
            let rhs: Vec<f32> = (0..batch * k * n).map(|i| (i % 5) as f32 * 0.5).collect();
            let got = Products { batch, m, k, n }.of(&lhs, &rhs);
            let want: Vec<f32> = (0..batch * m * n)
                .map(|i| {
                    let (step, row, column) = (i / (m * n), i / n % m, i % n);
                    (0..k).map(|j| lhs[(step * m + row) * k + j] * rhs[(step * k + j) * n + column]).sum()
                })
                .collect();
            assert_eq!(got, want, "{batch} × ({m}, {k}) × ({k}, {n})");
        }
    }
}
