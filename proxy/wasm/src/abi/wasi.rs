//! The `wasi_snapshot_preview1` functions a Rust filter built for `wasm32-wasip1` imports,
//! as small shims instead of a real WASI context (no filesystem, no sockets): `fd_write` to
//! stdout/stderr becomes a log line of the plugin, the environment is the plugin's `env`,
//! clocks and randomness are the host's, `proc_exit` stops the callback. The rest of what
//! C++/TinyGo modules import answers `ENOSYS`/`EBADF`.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use wasmtime::Linker;

use crate::abi::hostcalls::log_stdio;
use crate::context::HostState;
use crate::memory::{Ctx, HostAbort, abort, read, slice, with_mem, write, write_u32, write_u64};

const M: &str = "wasi_snapshot_preview1";
const SUCCESS: i32 = 0;
const EBADF: i32 = 8;
const EINVAL: i32 = 28;
const ENOSYS: i32 = 52;

type R = wasmtime::Result<i32>;

pub(crate) fn add_to_linker(l: &mut Linker<HostState>) -> wasmtime::Result<()> {
    l.func_wrap(
        M,
        "fd_write",
        |mut c: Ctx<'_>, fd: u32, iovs: u32, n: u32, written_out: u32| -> R {
            const CALL: &str = "fd_write";
            if fd != 1 && fd != 2 {
                return Ok(EBADF);
            }
            let (text, total) = with_mem(&mut c, CALL, |mem, _| {
                let mut text = Vec::new();
                for i in 0..n {
                    let iov = slice(mem, iovs.wrapping_add(i.wrapping_mul(8)), 8, CALL)?;
                    let ptr = u32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
                    let len = u32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
                    text.extend_from_slice(slice(mem, ptr, len, CALL)?);
                }
                let total = text.len() as u32;
                Ok((text, total))
            })?;
            log_stdio(c.data(), fd, &String::from_utf8_lossy(&text));
            write_u32(&mut c, written_out, total, CALL)?;
            Ok(SUCCESS)
        },
    )?;
    l.func_wrap(
        M,
        "environ_sizes_get",
        |mut c: Ctx<'_>, count_out: u32, size_out: u32| -> R {
            let env = c.data().plugin.environ.clone();
            write_u32(&mut c, count_out, env.len() as u32, "environ_sizes_get")?;
            let size: usize = env.iter().map(|e| e.len()).sum();
            write_u32(&mut c, size_out, size as u32, "environ_sizes_get")?;
            Ok(SUCCESS)
        },
    )?;
    l.func_wrap(
        M,
        "environ_get",
        |mut c: Ctx<'_>, ptrs: u32, buf: u32| -> R {
            let env = c.data().plugin.environ.clone();
            let mut at = buf;
            for (i, e) in env.iter().enumerate() {
                write_u32(&mut c, ptrs.wrapping_add(4 * i as u32), at, "environ_get")?;
                write(&mut c, at, e, "environ_get")?;
                at = at.wrapping_add(e.len() as u32);
            }
            Ok(SUCCESS)
        },
    )?;
    l.func_wrap(
        M,
        "args_sizes_get",
        |mut c: Ctx<'_>, count_out: u32, size_out: u32| -> R {
            write_u32(&mut c, count_out, 0, "args_sizes_get")?;
            write_u32(&mut c, size_out, 0, "args_sizes_get")?;
            Ok(SUCCESS)
        },
    )?;
    l.func_wrap(M, "args_get", |_c: Ctx<'_>, _ptrs: u32, _buf: u32| -> R {
        Ok(SUCCESS)
    })?;
    l.func_wrap(
        M,
        "proc_exit",
        |_c: Ctx<'_>, code: i32| -> wasmtime::Result<()> { Err(abort(HostAbort::Exit(code))) },
    )?;
    l.func_wrap(
        M,
        "clock_time_get",
        |mut c: Ctx<'_>, id: u32, _precision: u64, out: u32| -> R {
            let ns = match id {
                0 => SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64),
                1..=3 => monotonic_ns(),
                _ => return Ok(EINVAL),
            };
            write_u64(&mut c, out, ns, "clock_time_get")?;
            Ok(SUCCESS)
        },
    )?;
    l.func_wrap(
        M,
        "clock_res_get",
        |mut c: Ctx<'_>, _id: u32, out: u32| -> R {
            write_u64(&mut c, out, 1, "clock_res_get")?;
            Ok(SUCCESS)
        },
    )?;
    l.func_wrap(M, "random_get", |mut c: Ctx<'_>, buf: u32, len: u32| -> R {
        // Validate first, so a bad pointer traps rather than being half-written.
        let _ = read(&mut c, buf, 0, "random_get")?;
        let mut bytes = vec![0u8; len as usize];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
        write(&mut c, buf, &bytes, "random_get")?;
        Ok(SUCCESS)
    })?;
    l.func_wrap(M, "sched_yield", |_c: Ctx<'_>| -> R { Ok(SUCCESS) })?;
    l.func_wrap(M, "fd_close", |_c: Ctx<'_>, _fd: u32| -> R { Ok(EBADF) })?;
    l.func_wrap(
        M,
        "fd_fdstat_get",
        |_c: Ctx<'_>, _fd: u32, _out: u32| -> R { Ok(EBADF) },
    )?;
    l.func_wrap(
        M,
        "fd_prestat_get",
        |_c: Ctx<'_>, _fd: u32, _out: u32| -> R { Ok(EBADF) },
    )?;
    l.func_wrap(
        M,
        "fd_prestat_dir_name",
        |_c: Ctx<'_>, _fd: u32, _p: u32, _l: u32| -> R { Ok(EBADF) },
    )?;
    l.func_wrap(
        M,
        "fd_read",
        |_c: Ctx<'_>, _fd: u32, _i: u32, _n: u32, _o: u32| -> R { Ok(EBADF) },
    )?;
    l.func_wrap(
        M,
        "fd_seek",
        |_c: Ctx<'_>, _fd: u32, _off: i64, _w: u32, _o: u32| -> R { Ok(EBADF) },
    )?;
    l.func_wrap(
        M,
        "poll_oneoff",
        |_c: Ctx<'_>, _i: u32, _o: u32, _n: u32, _r: u32| -> R { Ok(ENOSYS) },
    )?;
    Ok(())
}

fn monotonic_ns() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}
