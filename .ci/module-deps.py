#!/usr/bin/env python3
# Dependency cycles between top-level modules of src/ (crate:: paths, tests excluded).
# Usage: python3 .ci/module-deps.py
import re,os,sys
root=os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'src')
def top(path):
    rel=os.path.relpath(path, root)
    parts=rel.split('/')
    if len(parts)==1: return parts[0][:-3]
    return parts[0]
edges={}
for dp,dn,fn in os.walk(root):
    for f in fn:
        if not f.endswith('.rs'): continue
        p=os.path.join(dp,f); m=top(p)
        if m in ('lib','main'): continue
        text=open(p).read()
        # drop test modules: from '#[cfg(test)]' to end of file (tests live at the end), and test-only files
        if f in ('tests.rs','test_support.rs'): continue
        i=text.find('#[cfg(test)]')
        if i>=0: text=text[:i]
        for t in re.findall(r'crate::([a-z_]+)', text):
            if t!=m: edges.setdefault(m,set()).add(t)
        # multi-line `use crate::{a, b::c}`
        for block in re.findall(r'use crate::\{([^;]*)\};', text, re.S):
            for t in re.findall(r'(?:^|[,{\s])([a-z_]+)(?:::|[,}\s])', block):
                if t not in ('self',) and t!=m and os.path.exists(os.path.join(root,t+'.rs')) or os.path.isdir(os.path.join(root,t)):
                    if t!=m: edges.setdefault(m,set()).add(t)
# Every cycle, not only two-way pairs: strongly connected components of more than one module.
def reach(a):
    seen=set(); todo=[a]
    while todo:
        for b in edges.get(todo.pop(),()):
            if b not in seen: seen.add(b); todo.append(b)
    return seen
r={m:reach(m) for m in edges}
cycles=sorted({tuple(sorted({m}|{n for n in r[m] if m in r.get(n,())})) for m in edges if m in r[m]})
for c in cycles: print("cycle:", " -> ".join(c))
print("modules:", len(edges), "cycles:", len(cycles))
sys.exit(1 if cycles else 0)
