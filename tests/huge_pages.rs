//! `HugePageHeap` marks the heap for transparent huge pages as it grows. Run without the test
//! harness (Cargo.toml), so the allocations below come from the main thread's heap, the one
//! the marking covers, as in the `ddpm` binary.

#[global_allocator]
static ALLOCATOR: ddpm::HugePageHeap = ddpm::HugePageHeap;

/// The `VmFlags` line of the mapping that holds `addr`, from /proc/self/smaps.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn vm_flags(addr: usize) -> Option<String> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut inside = false;
    for line in smaps.lines() {
        let range = line.split_whitespace().next().unwrap_or("");
        if let Some((lo, hi)) = range.split_once('-') {
            if let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16)) {
                inside = lo <= addr && addr < hi;
                continue;
            }
        }
        if inside {
            if let Some(flags) = line.strip_prefix("VmFlags:") {
                return Some(flags.trim().to_string());
            }
        }
    }
    None
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn main() {
    let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if !mode.contains("[madvise]") && !mode.contains("[always]") {
        println!("huge_pages: skipped, transparent huge pages are off here ({:?})", mode.trim());
        return;
    }
    ddpm::keep_freed_memory();
    // 16 MiB, below the 32 MiB mmap threshold keep_freed_memory sets: from the heap.
    let mut block = vec![0.0f32; 4 << 20];
    for (i, v) in block.iter_mut().enumerate() {
        *v = i as f32;
    }
    let middle = block.as_ptr() as usize + (8 << 20);
    let flags = vm_flags(middle).expect("the block's mapping is in /proc/self/smaps");
    assert!(
        flags.split_whitespace().any(|f| f == "hg"),
        "the heap under a 16 MiB block is not marked MADV_HUGEPAGE (VmFlags: {flags})"
    );
    // The values survive growing and shrinking through the allocator.
    block.resize(6 << 20, 1.0);
    assert!(block[..4 << 20].iter().enumerate().all(|(i, &v)| v == i as f32));
    block.truncate(1000);
    block.shrink_to_fit();
    assert_eq!(block[999], 999.0);
    println!("huge_pages: ok (VmFlags {flags})");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn main() {
    println!("huge_pages: skipped, the marking is for Linux/glibc only");
}
