//! Zeroing without `memset`: LLVM turns any zeroed run of 16 bytes or more into a `memset`
//! call, which this target implements as a byte-by-byte loop in a subprogram (four
//! instructions a byte). Volatile word stores into the value's final place cannot be merged
//! into one (zeroing a temporary and moving it would bring the memset back with the move).
use core::mem::{MaybeUninit, size_of};

/// Zeroes `v` in place, as 32-bit words, and returns it initialised.
///
/// # Safety
/// All-zero bytes must be a valid `T` (plain data, as the kernel's structs and our map types).
#[inline(always)]
pub unsafe fn zero<T>(v: &mut MaybeUninit<T>) -> &mut T {
    const { assert!(size_of::<T>().is_multiple_of(4) && align_of::<T>() >= 4) };
    let words = v.as_mut_ptr() as *mut u32;
    for i in 0..size_of::<T>() / 4 {
        // SAFETY: inside the value, and aligned for u32 (asserted above).
        unsafe { words.add(i).write_volatile(0) };
    }
    // SAFETY: every byte written above; zero is valid per the contract.
    unsafe { v.assume_init_mut() }
}

/// Zeroes `v` in place, as `zero` does.
///
/// # Safety
/// As `zero`.
#[inline(always)]
pub unsafe fn clear<T>(v: &mut T) -> &mut T {
    // SAFETY: MaybeUninit<T> has T's layout; the caller vouches for zero being a valid T.
    unsafe { zero(&mut *(v as *mut T as *mut MaybeUninit<T>)) }
}
