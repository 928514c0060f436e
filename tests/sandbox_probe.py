"""Run *inside* a sandbox (as `python -c <this file>`): what can an agent see?

argv[1]: the host's secret, base64 and reversed (so it is in no command line), argv[2:]:
strings that must appear in no path (another session's id, the host's data folder).
Prints one JSON object of findings.
"""

import base64
import json
import os
import sys

secret = base64.b64decode(sys.argv[1][::-1].encode())
forbidden = sys.argv[2:]
out = {"uid": os.getuid(), "gid": os.getgid(),
       "env_has_secret": any(secret.decode() in v for v in os.environ.values()),
       "token": os.environ.get("ANTHROPIC_API_KEY", ""),
       "warm": os.environ.get("NANOCLAW_WARM") == "1"}

proc_hits = []
for pid in os.listdir("/proc"):
    if pid.isdigit():
        for name in ("environ", "cmdline"):
            try:
                with open(f"/proc/{pid}/{name}", "rb") as f:
                    if secret in f.read():
                        proc_hits.append(f"/proc/{pid}/{name}")
            except OSError:
                pass
out["proc_hits"] = proc_hits

file_hits, forbidden_paths, scanned = [], [], 0
for top in ("/workspace", "/app", "/run", "/tmp", "/etc", "/home", "/root", "/var", "/srv",
            "/mnt", "/media"):
    for root, dirs, files in os.walk(top):
        for n in dirs + files:
            p = os.path.join(root, n)
            if any(f in p for f in forbidden):
                forbidden_paths.append(p)
        for n in files:
            p = os.path.join(root, n)
            try:
                with open(p, "rb") as f:
                    scanned += 1
                    if secret in f.read(5_000_000):
                        file_hits.append(p)
            except OSError:
                pass
out.update(file_hits=file_hits, forbidden_paths=forbidden_paths, scanned=scanned,
           forbidden_exist=[f for f in forbidden if os.path.exists(f)])

with open("/proc/self/mountinfo") as f:
    out["mounts"] = sorted({line.split()[4] for line in f})
with open("/proc/net/dev") as f:
    out["net"] = sorted(line.split(":")[0].strip() for line in f.readlines()[2:])
with open("/proc/self/status") as f:
    out["cap_eff"] = next(ln.split()[1] for ln in f if ln.startswith("CapEff"))
for name, path in (("root_writable", "/probe-write"), ("etc_writable", "/etc/probe-write"),
                   ("workspace_writable", "/workspace/.probe-write")):
    try:
        with open(path, "w") as f:
            f.write("x")
        os.unlink(path)
        out[name] = True
    except OSError:
        out[name] = False
print(json.dumps(out))
