//! The `env.proxy_*` host functions: every import the `proxy-wasm` 0.2.x SDK links, plus the
//! 0.2.1 additions. They act on the *effective* context (the stream or root whose callback is
//! running, or the one set by `proxy_set_effective_context`). Stream actions (resume, local
//! reply, close) and callouts are recorded and carried out after the callback returns, never
//! re-entering the instance. Calls we don't support yet answer with a status the SDK
//! tolerates and are logged once per instance.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use wasmtime::Linker;

use crate::abi::{BufferType, Direction, MapType, Status, log_level};
use crate::action::LocalReply;
use crate::callouts::{self, CalloutError};
use crate::context::{HostState, Outgoing, StreamEvent};
use crate::headers::{Headers, parse_pairs};
use crate::memory::{Ctx, read, return_bytes, return_with, slice, with_mem, write_u32, write_u64};
use crate::metrics::{MetricError, MetricKind};
use crate::properties::{self, Scope, split_path};
use crate::shared::SharedError;

type R = wasmtime::Result<i32>;

const OK: R = Ok(Status::Ok as i32);

fn st(s: Status) -> R {
    Ok(s.code())
}

/// Adds every host function to `linker`.
pub(crate) fn add_to_linker(l: &mut Linker<HostState>) -> wasmtime::Result<()> {
    // --- logging, time, timers
    l.func_wrap(
        "env",
        "proxy_log",
        |mut c: Ctx<'_>, level: i32, ptr: u32, len: u32| -> R {
            let msg = read(&mut c, ptr, len, "proxy_log")?;
            log(c.data(), level, &String::from_utf8_lossy(&msg));
            OK
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_log_level",
        |mut c: Ctx<'_>, out: u32| -> R {
            let level = match tracing::level_filters::LevelFilter::current().into_level() {
                Some(tracing::Level::TRACE) => 0,
                Some(tracing::Level::DEBUG) => 1,
                Some(tracing::Level::INFO) => 2,
                Some(tracing::Level::WARN) => 3,
                Some(tracing::Level::ERROR) => 4,
                None => 5,
            };
            write_u32(&mut c, out, level, "proxy_get_log_level")?;
            OK
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut c: Ctx<'_>, out: u32| -> R {
            let ns = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            write_u64(&mut c, out, ns, "proxy_get_current_time_nanoseconds")?;
            OK
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |mut c: Ctx<'_>, ms: u32| -> R {
            let s = c.data_mut();
            if s.effective == s.root_context {
                s.tick_change = Some(ms);
            } else {
                s.warn_once("proxy_set_tick_period_milliseconds from a stream context is ignored");
            }
            OK
        },
    )?;

    // --- buffers
    l.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut c: Ctx<'_>, t: i32, start: u32, max: u32, ptr_out: u32, len_out: u32| -> R {
            const CALL: &str = "proxy_get_buffer_bytes";
            let Some(t) = BufferType::from_abi(t) else {
                return st(Status::BadArgument);
            };
            let Some(len) = buffer(c.data(), t).map(<[u8]>::len) else {
                return st(Status::NotFound);
            };
            let start = start as usize;
            if start > len || (start == len && len > 0) {
                return st(Status::NotFound);
            }
            let end = start.saturating_add(max as usize).min(len);
            return_with(&mut c, end - start, ptr_out, len_out, CALL, |s, out| {
                if let Some(b) = buffer(s, t) {
                    out.copy_from_slice(&b[start..end]);
                }
            })?;
            OK
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut c: Ctx<'_>, t: i32, start: u32, size: u32, ptr: u32, len: u32| -> R {
            const CALL: &str = "proxy_set_buffer_bytes";
            with_mem(&mut c, CALL, |mem, s| {
                let data = slice(mem, ptr, len, CALL)?;
                let body = match (BufferType::from_abi(t), s.streams.get_mut(&s.effective)) {
                    (Some(BufferType::RequestBody), Some(ctx)) => &mut ctx.request_body,
                    (Some(BufferType::ResponseBody), Some(ctx)) => &mut ctx.response_body,
                    _ => {
                        s.warn_once(
                            "proxy_set_buffer_bytes: only request and response bodies can be set",
                        );
                        return OK;
                    }
                };
                // A splice, as the spec says; Envoy's (0,0) prepend, (0,>=len) replace and
                // (>=len,_) append are special cases of it.
                let begin = (start as usize).min(body.len());
                let end = begin.saturating_add(size as usize).min(body.len());
                let tail = body.split_off(end);
                body.truncate(begin);
                body.extend_from_slice(data);
                body.extend_from_slice(&tail);
                OK
            })
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_buffer_status",
        |mut c: Ctx<'_>, t: i32, len_out: u32, flags_out: u32| -> R {
            let len = BufferType::from_abi(t).and_then(|t| buffer(c.data(), t).map(<[u8]>::len));
            let Some(len) = len else {
                return st(Status::NotFound);
            };
            write_u32(&mut c, len_out, len as u32, "proxy_get_buffer_status")?;
            write_u32(&mut c, flags_out, 0, "proxy_get_buffer_status")?;
            OK
        },
    )?;

    // --- header maps
    l.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut c: Ctx<'_>, t: i32, ptr_out: u32, len_out: u32| -> R {
            const CALL: &str = "proxy_get_header_map_pairs";
            let Some(t) = MapType::from_abi(t) else {
                return st(Status::BadArgument);
            };
            let len = map(c.data(), t).map_or(4, Headers::serialized_len);
            return_with(&mut c, len, ptr_out, len_out, CALL, |s, out| {
                match map(s, t) {
                    Some(h) => h.serialize_into(out),
                    None => out.fill(0),
                }
            })?;
            OK
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut c: Ctx<'_>, t: i32, ptr: u32, len: u32| -> R {
            const CALL: &str = "proxy_set_header_map_pairs";
            let Some(t) = MapType::from_abi(t) else {
                return st(Status::BadArgument);
            };
            with_mem(&mut c, CALL, |mem, s| {
                let pairs = match parse_pairs(slice(mem, ptr, len, CALL)?) {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(plugin = %s.plugin.name, "{CALL}: {e}");
                        return st(Status::BadArgument);
                    }
                };
                match map_mut(s, t) {
                    Some(h) => {
                        if let Err(e) = h.set_all(pairs) {
                            tracing::warn!(plugin = %s.plugin.name, "{CALL}: {e}: skipped");
                        }
                    }
                    None => {
                        s.warn_once("proxy_set_header_map_pairs: that map can't be changed now")
                    }
                }
                OK
            })
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut c: Ctx<'_>, t: i32, kptr: u32, klen: u32, ptr_out: u32, len_out: u32| -> R {
            const CALL: &str = "proxy_get_header_map_value";
            let Some(t) = MapType::from_abi(t) else {
                return st(Status::BadArgument);
            };
            let value = with_mem(&mut c, CALL, |mem, s| {
                let key = slice(mem, kptr, klen, CALL)?;
                Ok(map(s, t).and_then(|h| h.get(key)).map(<[u8]>::to_vec))
            })?;
            match value {
                Some(v) => {
                    return_bytes(&mut c, &v, ptr_out, len_out, CALL)?;
                    OK
                }
                None => st(Status::NotFound),
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_add_header_map_value",
        |mut c: Ctx<'_>, t: i32, kptr: u32, klen: u32, vptr: u32, vlen: u32| -> R {
            mutate_map(
                &mut c,
                "proxy_add_header_map_value",
                t,
                kptr,
                klen,
                Some((vptr, vlen)),
                |h, k, v| h.add(k, v.unwrap_or_default()),
            )
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_replace_header_map_value",
        |mut c: Ctx<'_>, t: i32, kptr: u32, klen: u32, vptr: u32, vlen: u32| -> R {
            mutate_map(
                &mut c,
                "proxy_replace_header_map_value",
                t,
                kptr,
                klen,
                Some((vptr, vlen)),
                |h, k, v| h.replace(k, v.unwrap_or_default()),
            )
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut c: Ctx<'_>, t: i32, kptr: u32, klen: u32| -> R {
            mutate_map(
                &mut c,
                "proxy_remove_header_map_value",
                t,
                kptr,
                klen,
                None,
                |h, k, _| {
                    h.remove(k);
                    Ok(())
                },
            )
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_header_map_size",
        |mut c: Ctx<'_>, t: i32, out: u32| -> R {
            let Some(t) = MapType::from_abi(t) else {
                return st(Status::BadArgument);
            };
            let len = map(c.data(), t).map_or(4, Headers::serialized_len);
            write_u32(&mut c, out, len as u32, "proxy_get_header_map_size")?;
            OK
        },
    )?;

    // --- properties
    l.func_wrap(
        "env",
        "proxy_get_property",
        |mut c: Ctx<'_>, pptr: u32, plen: u32, ptr_out: u32, len_out: u32| -> R {
            const CALL: &str = "proxy_get_property";
            let value = with_mem(&mut c, CALL, |mem, s| {
                Ok(get_property(s, slice(mem, pptr, plen, CALL)?))
            })?;
            match value {
                Some(v) => {
                    return_bytes(&mut c, &v, ptr_out, len_out, CALL)?;
                    OK
                }
                None => st(Status::NotFound),
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_property",
        |mut c: Ctx<'_>, pptr: u32, plen: u32, vptr: u32, vlen: u32| -> R {
            const CALL: &str = "proxy_set_property";
            with_mem(&mut c, CALL, |mem, s| {
                let path = normalize_path(slice(mem, pptr, plen, CALL)?);
                let value = slice(mem, vptr, vlen, CALL)?.to_vec();
                let eff = s.effective;
                match s.streams.get_mut(&eff) {
                    Some(ctx) => ctx.properties.insert(path, value),
                    None => s.root_properties.insert(path, value),
                };
                OK
            })
        },
    )?;

    // --- shared data and queues
    l.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut c: Ctx<'_>, kptr: u32, klen: u32, ptr_out: u32, len_out: u32, cas_out: u32| -> R {
            const CALL: &str = "proxy_get_shared_data";
            let found = with_mem(&mut c, CALL, |mem, s| {
                let key = slice(mem, kptr, klen, CALL)?;
                Ok(s.host.shared.get(&s.plugin.vm_id, key))
            })?;
            let Some((value, cas)) = found else {
                return st(Status::NotFound);
            };
            return_bytes(&mut c, &value, ptr_out, len_out, CALL)?;
            write_u32(&mut c, cas_out, cas, CALL)?;
            OK
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut c: Ctx<'_>, kptr: u32, klen: u32, vptr: u32, vlen: u32, cas: u32| -> R {
            const CALL: &str = "proxy_set_shared_data";
            with_mem(&mut c, CALL, |mem, s| {
                let key = slice(mem, kptr, klen, CALL)?;
                let value = slice(mem, vptr, vlen, CALL)?;
                match s.host.shared.set(&s.plugin.vm_id, key, value, cas) {
                    Ok(()) => OK,
                    Err(_) => st(Status::CasMismatch),
                }
            })
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_register_shared_queue",
        |mut c: Ctx<'_>, nptr: u32, nlen: u32, id_out: u32| -> R {
            const CALL: &str = "proxy_register_shared_queue";
            let id = with_mem(&mut c, CALL, |mem, s| {
                let name = slice(mem, nptr, nlen, CALL)?;
                Ok(s.host
                    .shared
                    .register_queue(&s.plugin.vm_id, name, s.queue_waker.clone()))
            })?;
            write_u32(&mut c, id_out, id, CALL)?;
            OK
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_resolve_shared_queue",
        |mut c: Ctx<'_>, vptr: u32, vlen: u32, nptr: u32, nlen: u32, id_out: u32| -> R {
            const CALL: &str = "proxy_resolve_shared_queue";
            let id = with_mem(&mut c, CALL, |mem, s| {
                let vm_id = String::from_utf8_lossy(slice(mem, vptr, vlen, CALL)?).into_owned();
                let name = slice(mem, nptr, nlen, CALL)?;
                Ok(s.host.shared.resolve_queue(&vm_id, name))
            })?;
            let Some(id) = id else {
                return st(Status::NotFound);
            };
            write_u32(&mut c, id_out, id, CALL)?;
            OK
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_enqueue_shared_queue",
        |mut c: Ctx<'_>, id: u32, vptr: u32, vlen: u32| -> R {
            const CALL: &str = "proxy_enqueue_shared_queue";
            with_mem(&mut c, CALL, |mem, s| {
                let value = slice(mem, vptr, vlen, CALL)?;
                match s.host.shared.enqueue(id, value) {
                    Ok(()) => OK,
                    Err(_) => st(Status::NotFound),
                }
            })
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_dequeue_shared_queue",
        |mut c: Ctx<'_>, id: u32, ptr_out: u32, len_out: u32| -> R {
            let item = c.data().host.shared.dequeue(id);
            match item {
                Ok(v) => {
                    return_bytes(&mut c, &v, ptr_out, len_out, "proxy_dequeue_shared_queue")?;
                    OK
                }
                Err(SharedError::Empty) => st(Status::Empty),
                Err(_) => st(Status::NotFound),
            }
        },
    )?;

    // --- stream control
    l.func_wrap(
        "env",
        "proxy_continue_stream",
        |mut c: Ctx<'_>, t: i32| -> R { stream_event(c.data_mut(), t, StreamEvent::Resume) },
    )?;
    l.func_wrap("env", "proxy_close_stream", |mut c: Ctx<'_>, t: i32| -> R {
        stream_event(c.data_mut(), t, |_| StreamEvent::Close)
    })?;
    // ABI 0.1.0 names, harmless to offer.
    l.func_wrap("env", "proxy_continue_request", |mut c: Ctx<'_>| -> R {
        stream_event(c.data_mut(), 0, StreamEvent::Resume)
    })?;
    l.func_wrap("env", "proxy_continue_response", |mut c: Ctx<'_>| -> R {
        stream_event(c.data_mut(), 1, StreamEvent::Resume)
    })?;
    l.func_wrap("env", "proxy_clear_route_cache", |_c: Ctx<'_>| -> R { OK })?;
    l.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut c: Ctx<'_>,
         status: u32,
         dptr: u32,
         dlen: u32,
         bptr: u32,
         blen: u32,
         hptr: u32,
         hlen: u32,
         _grpc: i32|
         -> R {
            const CALL: &str = "proxy_send_local_response";
            with_mem(&mut c, CALL, |mem, s| {
                let details = String::from_utf8_lossy(slice(mem, dptr, dlen, CALL)?).into_owned();
                let body = Bytes::copy_from_slice(slice(mem, bptr, blen, CALL)?);
                let pairs = parse_pairs(slice(mem, hptr, hlen, CALL)?).unwrap_or_default();
                let mut headers = Headers::plain(http::HeaderMap::new());
                for (k, v) in pairs {
                    if let Err(e) = headers.add(k, v) {
                        tracing::warn!(plugin = %s.plugin.name, "{CALL}: {e}: skipped");
                    }
                }
                let eff = s.effective;
                let Some(ctx) = s.streams.get_mut(&eff) else {
                    s.warn_once("proxy_send_local_response outside a stream is ignored");
                    return OK;
                };
                if ctx.local_reply_sent {
                    // Envoy crashed on a second reply (envoyproxy/envoy#13857); ours is a no-op.
                    tracing::warn!(plugin = %s.plugin.name, "{CALL}: a second local reply is ignored");
                    return OK;
                }
                ctx.local_reply_sent = true;
                let reply = LocalReply { status: status as u16, headers: headers.map, body, details };
                s.deferred.push((eff, StreamEvent::LocalReply(reply)));
                OK
            })
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_effective_context",
        |mut c: Ctx<'_>, ctx: u32| -> R {
            let s = c.data_mut();
            if ctx == s.root_context || s.streams.contains_key(&ctx) {
                s.effective = ctx;
                OK
            } else {
                st(Status::BadArgument)
            }
        },
    )?;
    l.func_wrap("env", "proxy_done", |mut c: Ctx<'_>| -> R {
        let s = c.data_mut();
        let eff = s.effective;
        s.done.insert(eff);
        OK
    })?;

    // --- HTTP callouts
    l.func_wrap(
        "env",
        "proxy_http_call",
        |mut c: Ctx<'_>,
         uptr: u32,
         ulen: u32,
         hptr: u32,
         hlen: u32,
         bptr: u32,
         blen: u32,
         tptr: u32,
         tlen: u32,
         timeout_ms: u32,
         token_out: u32|
         -> R {
            const CALL: &str = "proxy_http_call";
            let started = with_mem(&mut c, CALL, |mem, s| {
                let upstream = String::from_utf8_lossy(slice(mem, uptr, ulen, CALL)?).into_owned();
                let headers = slice(mem, hptr, hlen, CALL)?;
                let body = slice(mem, bptr, blen, CALL)?;
                let _trailers = slice(mem, tptr, tlen, CALL)?;
                Ok(start_callout(s, upstream, headers, body, timeout_ms))
            })?;
            match started {
                Ok(token) => {
                    write_u32(&mut c, token_out, token, CALL)?;
                    OK
                }
                Err(status) => st(status),
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_status",
        |mut c: Ctx<'_>, code_out: u32, ptr_out: u32, len_out: u32| -> R {
            write_u32(&mut c, code_out, 0, "proxy_get_status")?;
            return_bytes(&mut c, b"", ptr_out, len_out, "proxy_get_status")?;
            OK
        },
    )?;

    // --- gRPC callouts: not supported yet (statuses the SDK tolerates)
    l.func_wrap(
        "env",
        "proxy_grpc_call",
        |mut c: Ctx<'_>,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32|
         -> R {
            c.data_mut()
                .warn_once("proxy_grpc_call is not supported yet: INTERNAL_FAILURE");
            st(Status::InternalFailure)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_grpc_stream",
        |mut c: Ctx<'_>,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32,
         _: u32|
         -> R {
            c.data_mut()
                .warn_once("proxy_grpc_stream is not supported yet: INTERNAL_FAILURE");
            st(Status::InternalFailure)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_grpc_send",
        |mut c: Ctx<'_>, _: u32, _: u32, _: u32, _: u32| -> R {
            c.data_mut()
                .warn_once("proxy_grpc_send is not supported yet: NOT_FOUND");
            st(Status::NotFound)
        },
    )?;
    l.func_wrap("env", "proxy_grpc_cancel", |mut c: Ctx<'_>, _: u32| -> R {
        c.data_mut()
            .warn_once("proxy_grpc_cancel is not supported yet: NOT_FOUND");
        st(Status::NotFound)
    })?;
    l.func_wrap("env", "proxy_grpc_close", |mut c: Ctx<'_>, _: u32| -> R {
        c.data_mut()
            .warn_once("proxy_grpc_close is not supported yet: NOT_FOUND");
        st(Status::NotFound)
    })?;

    // --- foreign functions
    l.func_wrap(
        "env",
        "proxy_call_foreign_function",
        |mut c: Ctx<'_>,
         nptr: u32,
         nlen: u32,
         _aptr: u32,
         _alen: u32,
         ptr_out: u32,
         len_out: u32|
         -> R {
            const CALL: &str = "proxy_call_foreign_function";
            let name = read(&mut c, nptr, nlen, CALL)?;
            if name == b"clear_route_cache" {
                // wasmesh routes after the request-header filters ran: nothing to clear.
                return_bytes(&mut c, b"", ptr_out, len_out, CALL)?;
                return OK;
            }
            c.data_mut()
                .warn_once("proxy_call_foreign_function: only clear_route_cache is known");
            st(Status::NotFound)
        },
    )?;

    // --- metrics
    l.func_wrap(
        "env",
        "proxy_define_metric",
        |mut c: Ctx<'_>, t: i32, nptr: u32, nlen: u32, id_out: u32| -> R {
            const CALL: &str = "proxy_define_metric";
            let Some(kind) = MetricKind::from_abi(t) else {
                return st(Status::BadArgument);
            };
            let name = read(&mut c, nptr, nlen, CALL)?;
            let id = c
                .data()
                .host
                .metrics
                .define(kind, &String::from_utf8_lossy(&name));
            write_u32(&mut c, id_out, id, CALL)?;
            OK
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_increment_metric",
        |c: Ctx<'_>, id: u32, delta: i64| -> R {
            metric_status(c.data().host.metrics.increment(id, delta))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_record_metric",
        |c: Ctx<'_>, id: u32, value: u64| -> R {
            metric_status(c.data().host.metrics.record(id, value))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_metric",
        |mut c: Ctx<'_>, id: u32, out: u32| -> R {
            match c.data().host.metrics.read(id) {
                Ok(v) => {
                    write_u64(&mut c, out, v, "proxy_get_metric")?;
                    OK
                }
                Err(e) => metric_status(Err(e)),
            }
        },
    )?;
    Ok(())
}

fn log(s: &HostState, level: i32, msg: &str) {
    let (plugin, root) = (&s.plugin.name, &s.plugin.root_id);
    match log_level(level) {
        tracing::Level::TRACE => {
            tracing::trace!(target: "wasm", plugin = %plugin, root_id = %root, "{msg}")
        }
        tracing::Level::DEBUG => {
            tracing::debug!(target: "wasm", plugin = %plugin, root_id = %root, "{msg}")
        }
        tracing::Level::INFO => {
            tracing::info!(target: "wasm", plugin = %plugin, root_id = %root, "{msg}")
        }
        tracing::Level::WARN => {
            tracing::warn!(target: "wasm", plugin = %plugin, root_id = %root, "{msg}")
        }
        _ => tracing::error!(target: "wasm", plugin = %plugin, root_id = %root, "{msg}"),
    }
}

/// Logs what a WASI `fd_write` to stdout (info) or stderr (error) carried.
pub(crate) fn log_stdio(s: &HostState, fd: u32, msg: &str) {
    log(s, if fd == 2 { 4 } else { 2 }, msg.trim_end_matches('\n'));
}

fn buffer(s: &HostState, t: BufferType) -> Option<&[u8]> {
    match t {
        BufferType::VmConfiguration if !s.plugin.vm_config.is_empty() => Some(&s.plugin.vm_config),
        BufferType::PluginConfiguration if !s.plugin.plugin_config.is_empty() => {
            Some(&s.plugin.plugin_config)
        }
        BufferType::RequestBody => s.stream().map(|c| &c.request_body[..]),
        BufferType::ResponseBody => s.stream().map(|c| &c.response_body[..]),
        BufferType::CallResponseBody => s.call_response.as_ref().map(|(_, b, _)| &b[..]),
        _ => None,
    }
}

fn map(s: &HostState, t: MapType) -> Option<&Headers> {
    match t {
        MapType::CallResponseHeaders => s.call_response.as_ref().map(|(h, _, _)| h),
        MapType::CallResponseTrailers => s.call_response.as_ref().map(|(_, _, t)| t),
        MapType::RequestHeaders => s.stream()?.request_headers.as_ref(),
        MapType::RequestTrailers => s.stream()?.request_trailers.as_ref(),
        MapType::ResponseHeaders => s.stream()?.response_headers.as_ref(),
        MapType::ResponseTrailers => s.stream()?.response_trailers.as_ref(),
        MapType::GrpcInitialMetadata | MapType::GrpcTrailingMetadata => None,
    }
}

fn map_mut(s: &mut HostState, t: MapType) -> Option<&mut Headers> {
    match t {
        MapType::CallResponseHeaders => s.call_response.as_mut().map(|(h, _, _)| h),
        MapType::CallResponseTrailers => s.call_response.as_mut().map(|(_, _, t)| t),
        MapType::RequestHeaders => s.stream_mut()?.request_headers.as_mut(),
        MapType::RequestTrailers => s.stream_mut()?.request_trailers.as_mut(),
        MapType::ResponseHeaders => s.stream_mut()?.response_headers.as_mut(),
        MapType::ResponseTrailers => s.stream_mut()?.response_trailers.as_mut(),
        MapType::GrpcInitialMetadata | MapType::GrpcTrailingMetadata => None,
    }
}

type Mutation = fn(&mut Headers, &[u8], Option<&[u8]>) -> Result<(), crate::headers::HeaderError>;

fn mutate_map(
    c: &mut Ctx<'_>,
    call: &'static str,
    t: i32,
    kptr: u32,
    klen: u32,
    value: Option<(u32, u32)>,
    f: Mutation,
) -> R {
    let Some(t) = MapType::from_abi(t) else {
        return st(Status::BadArgument);
    };
    with_mem(c, call, |mem, s| {
        let key = slice(mem, kptr, klen, call)?;
        let value = match value {
            Some((p, l)) => Some(slice(mem, p, l, call)?),
            None => None,
        };
        match map_mut(s, t) {
            Some(h) => {
                if let Err(e) = f(h, key, value) {
                    tracing::warn!(plugin = %s.plugin.name, "{call}: {e}: not applied");
                }
            }
            None => s.warn_once(
                "a header map was changed outside the callbacks that may change it; ignored",
            ),
        }
        OK
    })
}

fn stream_event(s: &mut HostState, t: i32, ev: fn(Direction) -> StreamEvent) -> R {
    let Some(dir) = Direction::from_abi(t) else {
        s.warn_once("proxy_continue_stream/close_stream on a TCP stream type is ignored");
        return OK;
    };
    let eff = s.effective;
    if s.streams.contains_key(&eff) {
        s.deferred.push((eff, ev(dir)));
    } else {
        s.warn_once(
            "proxy_continue_stream/close_stream without an effective stream context is ignored",
        );
    }
    OK
}

fn normalize_path(raw: &[u8]) -> Vec<u8> {
    split_path(raw).join(&0u8)
}

fn get_property(s: &HostState, raw: &[u8]) -> Option<Vec<u8>> {
    let key = normalize_path(raw);
    let stream = s.stream();
    if let Some(v) = stream
        .and_then(|c| c.properties.get(&key))
        .or_else(|| s.root_properties.get(&key))
    {
        return Some(v.clone());
    }
    let path = split_path(raw);
    let scope = Scope {
        plugin_name: &s.plugin.name,
        root_id: &s.plugin.root_id,
        vm_id: &s.plugin.vm_id,
        node: &s.host.config.node,
        info: stream.map(|c| &*c.info),
        request_headers: stream.and_then(|c| c.request_headers.as_ref()),
        request: stream.and_then(|c| c.request.as_ref()),
        response_headers: stream.and_then(|c| c.response_headers.as_ref()),
        response_code: stream.and_then(|c| c.response_code),
        upstream: stream.and_then(|c| c.upstream),
    };
    properties::resolve(&scope, &path)
}

fn start_callout(
    s: &mut HostState,
    upstream: String,
    headers: &[u8],
    body: &[u8],
    timeout_ms: u32,
) -> Result<u32, Status> {
    let Some(provider) = s.host.config.callouts.clone() else {
        s.warn_once("proxy_http_call: this proxy has no callout provider: BAD_ARGUMENT");
        return Err(Status::BadArgument);
    };
    if tokio::runtime::Handle::try_current().is_err() {
        s.warn_once("proxy_http_call outside a tokio runtime: INTERNAL_FAILURE");
        return Err(Status::InternalFailure);
    }
    let pairs = parse_pairs(headers).map_err(|_| Status::BadArgument)?;
    let request = callouts::build_request(&pairs, body).map_err(|e| {
        tracing::warn!(plugin = %s.plugin.name, "proxy_http_call: {e}");
        Status::BadArgument
    })?;
    let timeout = if timeout_ms == 0 {
        Duration::from_secs(60)
    } else {
        Duration::from_millis(timeout_ms.into())
    };
    let future = provider.call(&upstream, request, timeout).map_err(|e| {
        tracing::warn!(plugin = %s.plugin.name, "proxy_http_call: {e}");
        match e {
            CalloutError::UnknownUpstream(_) | CalloutError::BadRequest(_) => Status::BadArgument,
        }
    })?;
    let token = s.new_token();
    s.callouts.insert(token, s.effective);
    s.outgoing.push(Outgoing {
        token,
        future,
        timeout,
    });
    Ok(token)
}

fn metric_status(r: Result<(), MetricError>) -> R {
    match r {
        Ok(()) => OK,
        Err(MetricError::NotFound(_)) => st(Status::NotFound),
        Err(_) => st(Status::BadArgument),
    }
}
