#!/usr/bin/env python3
"""Instructions per request from run.sh's callgrind dumps: per setting (tracing off, 1 %, 100 %)
the proxies' (client and server side together) instructions, I1 misses and D1 misses per
request, and what tracing adds, by crate and by function.

Each proxy dumps its counts every 20M basic blocks; the monitor logged its requests every 2 s.
A dump's requests are interpolated at its file's time; the first and the last dump of each
proxy (start-up, the pair's end) are left out.

usage: per_request.py DIR [LABEL]
"""
import collections
import glob
import os
import re
import sys

EVENTS = ['Ir', 'Dr', 'Dw', 'I1mr', 'D1mr', 'D1mw', 'ILmr', 'DLmr', 'DLmw']
SETTINGS = [('off', 'tracing off'), ('0.01', '1 % sampled'), ('1', '100 % sampled')]
GROUPS = [('h2::hpack::huffman', 'h2: HPACK Huffman'), ('h2::hpack', 'h2: HPACK, the rest'),
          ('h2::', 'h2: the rest'), ('<h2', 'h2: the rest'),
          ('wasmesh_proxy::otel', 'wasmesh: otel'), ('wasmesh_proxy::', 'wasmesh: the rest'),
          ('<wasmesh_proxy', 'wasmesh: the rest'), ('http::', 'http (header map)'),
          ('<http', 'http (header map)'), ('hyper', 'hyper'), ('<hyper', 'hyper'),
          ('tokio', 'tokio'), ('<tokio', 'tokio'), ('mi_', 'allocator'), ('_mi_', 'allocator'),
          ('__mem', 'libc memcpy/memcmp'), ('bytes::', 'bytes'), ('<bytes', 'bytes'),
          ('rand', 'rand')]


def group(fn):
    for prefix, name in GROUPS:
        if fn.startswith(prefix):
            return name
    return 'the rest (std, core, libc, …)'


def read_monitor(path):
    samples, ratios = collections.defaultdict(list), collections.defaultdict(collections.Counter)
    for line in open(path):
        parts = line.split()
        if len(parts) != 4:
            continue
        t, pid, ratio, req = parts
        samples[int(pid)].append((float(t), int(req)))
        ratios[int(pid)][ratio] += 1
    # A proxy's setting is what most of its lines say: the one taken while it was being
    # killed could not read its environment and says "off".
    label = {pid: c.most_common(1)[0][0] for pid, c in ratios.items()}
    return samples, label


def requests_at(samples, t):
    for (t0, r0), (t1, r1) in zip(samples, samples[1:]):
        if t0 <= t <= t1 and t1 > t0:
            return r0 + (r1 - r0) * (t - t0) / (t1 - t0)
    return None


def self_costs(path, names):
    """Self cost per function in one dump; `names` carries the compressed names across dumps."""
    costs = collections.defaultdict(lambda: [0] * len(EVENTS))
    cur, skip = None, False
    for line in open(path, errors='replace'):
        if line.startswith(('fn=', 'cfn=')):
            m = re.match(r'c?fn=\((\d+)\)(?: (.*))?', line.rstrip('\n'))
            if m.group(2):
                names[m.group(1)] = m.group(2)
            if line.startswith('fn='):
                cur = names.get(m.group(1), m.group(1))
            continue
        if line.startswith('calls='):
            skip = True  # the next cost line is the call's inclusive cost
            continue
        if line[:1].isdigit() or line[:1] in '+-*':
            if skip:
                skip = False
                continue
            v = costs[cur]
            for i, x in enumerate(line.split()[1:]):
                v[i] += int(x)
    return costs


def main():
    d = sys.argv[1]
    title = sys.argv[2] if len(sys.argv) > 2 else ''
    samples, label = read_monitor(os.path.join(d, 'monitor.log'))
    dumps = collections.defaultdict(list)
    for f in glob.glob(os.path.join(d, 'cg.*.out.*')):
        _, pid, _, n = os.path.basename(f).split('.')
        dumps[int(pid)].append((int(n), os.path.getmtime(f), f))
    per = {}  # setting -> function -> [events per request]
    used = collections.defaultdict(list)
    for pid, ds in sorted(dumps.items()):
        if pid not in label:
            continue
        ds.sort()
        windows = []
        for (_, t0, _), (_, t1, f) in zip(ds, ds[1:]):
            a, b = requests_at(samples[pid], t0), requests_at(samples[pid], t1)
            if a is not None and b is not None and b - a >= 100:
                windows.append((b - a, f))
        windows = windows[1:-1]
        if not windows:
            sys.exit(f'per_request.py: proxy {pid} ({label[pid]}): no dump inside its load')
        n = sum(w for w, _ in windows)
        used[label[pid]].append(n)
        keep = {f for _, f in windows}
        names = {}
        acc = per.setdefault(label[pid], collections.defaultdict(lambda: [0.0] * len(EVENTS)))
        for _, _, f in ds:
            costs = self_costs(f, names)
            if f in keep:
                for fn, v in costs.items():
                    for i, x in enumerate(v):
                        acc[fn][i] += x / n
    missing = [s for s, _ in SETTINGS if s not in per]
    if missing:
        sys.exit(f'per_request.py: no counts for {missing}')
    tot = {s: [sum(v[i] for v in per[s].values()) for i in range(len(EVENTS))] for s, _ in SETTINGS}
    ir, i1, d1 = 0, 3, (4, 5)
    print(f'## Instructions per request, both proxies {title}\n')
    print('| setting | requests counted (client side, server side) | instructions | × off | I1 misses | × off | D1 misses | × off |')
    print('|---|---|---|---|---|---|---|---|')
    for s, name in SETTINGS:
        t, b = tot[s], tot['off']
        dm, bm = t[d1[0]] + t[d1[1]], b[d1[0]] + b[d1[1]]
        print(f'| {name} | {", ".join("%.0f" % n for n in used[s])} | {t[ir]:,.0f} | {t[ir] / b[ir]:.3f} '
              f'| {t[i1]:,.0f} | {t[i1] / b[i1]:.3f} | {dm:,.0f} | {dm / bm:.3f} |')
    print('\n### What tracing adds, by crate (instructions per request)\n')
    print('| | tracing off | 1 % sampled: added | 100 % sampled: added | added, share of off |')
    print('|---|---|---|---|---|')
    by = {s: collections.Counter() for s, _ in SETTINGS}
    for s, _ in SETTINGS:
        for fn, v in per[s].items():
            by[s][group(fn)] += v[ir]
    names = sorted(set().union(*by.values()), key=lambda g: -(by['1'][g] - by['off'][g]))
    for g in names:
        a1, a100 = by['0.01'][g] - by['off'][g], by['1'][g] - by['off'][g]
        print(f'| {g} | {by["off"][g]:,.0f} | {a1:+,.0f} | {a100:+,.0f} | {100 * a100 / tot["off"][ir]:+.1f} % |')
    print('\n### The functions that add most at 100 % (instructions per request)\n')
    delta = {fn: per['1'].get(fn, [0])[ir] - per['off'].get(fn, [0])[ir]
             for fn in set(per['1']) | set(per['off'])}
    for fn, v in sorted(delta.items(), key=lambda kv: -kv[1])[:20]:
        print(f'- {v:+,.0f}  `{fn[:110]}` (1 %: {per["0.01"].get(fn, [0])[ir] - per["off"].get(fn, [0])[ir]:+,.0f})')
    print('\n### The functions that add most D1 misses (reads and writes, per request)\n')

    def misses(setting, fn):
        v = per[setting].get(fn)
        return v[d1[0]] + v[d1[1]] if v else 0.0

    fns = set(per['1']) | set(per['0.01']) | set(per['off'])
    delta = {fn: (misses('0.01', fn) - misses('off', fn), misses('1', fn) - misses('off', fn))
             for fn in fns}
    for fn, (a1, a100) in sorted(delta.items(), key=lambda kv: -max(kv[1]))[:15]:
        print(f'- 1 %: {a1:+,.1f}, 100 %: {a100:+,.1f}  `{fn[:110]}`')


if __name__ == '__main__':
    main()
