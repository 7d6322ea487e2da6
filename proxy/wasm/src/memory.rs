//! Guest memory access for host functions: every pointer and length a filter hands the host is
//! bounds-checked against the instance's own linear memory, and data the host returns is
//! written into memory the guest allocated (`proxy_on_memory_allocate`, or `malloc` for
//! `wasm32-unknown-unknown` modules), then its address and size through the guest's out
//! pointers. A bad pointer is a [`HostAbort`]: the callback traps and the fault is contained
//! like any other trap — the host never reads or writes outside that instance.

use wasmtime::{Caller, Memory};

use crate::context::HostState;

/// Why a host function stopped the guest (the callback traps with this error).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum HostAbort {
    #[error("{call}: pointer {ptr:#x} with length {len} is outside the module's memory")]
    OutOfBounds {
        call: &'static str,
        ptr: u32,
        len: u32,
    },
    #[error("{call}: the module exports no memory")]
    NoMemory { call: &'static str },
    #[error("{call}: the module exports no allocator (proxy_on_memory_allocate or malloc)")]
    NoAllocator { call: &'static str },
    #[error("{call}: the module's allocator returned null for {len} bytes")]
    AllocFailed { call: &'static str, len: u32 },
    #[error("the module called proc_exit({0})")]
    Exit(i32),
    #[error("the callback used up its CPU time")]
    Deadline,
}

pub(crate) type Ctx<'a> = Caller<'a, HostState>;

pub(crate) fn abort(e: HostAbort) -> wasmtime::Error {
    wasmtime::Error::new(e)
}

fn memory(c: &Ctx<'_>, call: &'static str) -> wasmtime::Result<Memory> {
    c.data()
        .memory
        .ok_or_else(|| abort(HostAbort::NoMemory { call }))
}

/// The guest bytes at `ptr..ptr+len`.
pub(crate) fn slice<'m>(
    mem: &'m [u8],
    ptr: u32,
    len: u32,
    call: &'static str,
) -> wasmtime::Result<&'m [u8]> {
    let start = ptr as usize;
    start
        .checked_add(len as usize)
        .and_then(|end| mem.get(start..end))
        .ok_or_else(|| abort(HostAbort::OutOfBounds { call, ptr, len }))
}

fn slice_mut<'m>(
    mem: &'m mut [u8],
    ptr: u32,
    len: u32,
    call: &'static str,
) -> wasmtime::Result<&'m mut [u8]> {
    let start = ptr as usize;
    start
        .checked_add(len as usize)
        .and_then(|end| mem.get_mut(start..end))
        .ok_or_else(|| abort(HostAbort::OutOfBounds { call, ptr, len }))
}

/// Runs `f` with the guest's memory and the host state borrowed together (no copies).
pub(crate) fn with_mem<R>(
    c: &mut Ctx<'_>,
    call: &'static str,
    f: impl FnOnce(&mut [u8], &mut HostState) -> wasmtime::Result<R>,
) -> wasmtime::Result<R> {
    let mem = memory(c, call)?;
    let (bytes, state) = mem.data_and_store_mut(c);
    f(bytes, state)
}

/// Copies `ptr..ptr+len` out of the guest.
pub(crate) fn read(
    c: &mut Ctx<'_>,
    ptr: u32,
    len: u32,
    call: &'static str,
) -> wasmtime::Result<Vec<u8>> {
    let mem = memory(c, call)?;
    Ok(slice(mem.data(&*c), ptr, len, call)?.to_vec())
}

/// Writes `data` at `ptr`.
pub(crate) fn write(
    c: &mut Ctx<'_>,
    ptr: u32,
    data: &[u8],
    call: &'static str,
) -> wasmtime::Result<()> {
    let mem = memory(c, call)?;
    slice_mut(mem.data_mut(&mut *c), ptr, data.len() as u32, call)?.copy_from_slice(data);
    Ok(())
}

pub(crate) fn write_u32(
    c: &mut Ctx<'_>,
    ptr: u32,
    v: u32,
    call: &'static str,
) -> wasmtime::Result<()> {
    write(c, ptr, &v.to_le_bytes(), call)
}

pub(crate) fn write_u64(
    c: &mut Ctx<'_>,
    ptr: u32,
    v: u64,
    call: &'static str,
) -> wasmtime::Result<()> {
    write(c, ptr, &v.to_le_bytes(), call)
}

/// Allocates `len` bytes in the guest, lets `fill` write them (with the host state at hand),
/// and stores the address and size through `ptr_out` / `len_out`.
pub(crate) fn return_with(
    c: &mut Ctx<'_>,
    len: usize,
    ptr_out: u32,
    len_out: u32,
    call: &'static str,
    fill: impl FnOnce(&HostState, &mut [u8]),
) -> wasmtime::Result<()> {
    let alloc = c
        .data()
        .alloc
        .clone()
        .ok_or_else(|| abort(HostAbort::NoAllocator { call }))?;
    let len32 = u32::try_from(len).map_err(|_| {
        abort(HostAbort::AllocFailed {
            call,
            len: u32::MAX,
        })
    })?;
    let ptr = alloc.call(&mut *c, len32)?;
    if ptr == 0 {
        return Err(abort(HostAbort::AllocFailed { call, len: len32 }));
    }
    with_mem(c, call, |mem, state| {
        fill(state, slice_mut(mem, ptr, len32, call)?);
        Ok(())
    })?;
    write_u32(c, ptr_out, ptr, call)?;
    write_u32(c, len_out, len32, call)
}

/// [`return_with`] for bytes the caller already has.
pub(crate) fn return_bytes(
    c: &mut Ctx<'_>,
    data: &[u8],
    ptr_out: u32,
    len_out: u32,
    call: &'static str,
) -> wasmtime::Result<()> {
    return_with(c, data.len(), ptr_out, len_out, call, |_, out| {
        out.copy_from_slice(data)
    })
}
