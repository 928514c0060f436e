"""Hostile ground has one door (DESIGN §4): no host code touches an agent's folders by
path. This walks the host's code and fails on any filesystem call whose path mentions an
agent folder (a session's `work/`, a group folder, an inbox, outbox or heartbeat), unless
it is `hostile.Folder.open` itself. It is a guard against the next careless line, and it
is shown to catch such lines."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST_CODE = [p for d in ("nanoclaw", "workers") for p in sorted((ROOT / d).rglob("*.py"))
             if p.name != "hostile.py" and "devtools" not in p.parts]

# what reaches the filesystem by name
FS_FUNCS = {
    "open", "io.open", "os.open", "os.stat", "os.lstat", "os.unlink", "os.remove",
    "os.rename", "os.replace", "os.mkdir", "os.makedirs", "os.rmdir", "os.removedirs",
    "os.listdir", "os.scandir", "os.walk", "os.chown", "os.lchown", "os.chmod", "os.link",
    "os.symlink", "os.utime", "os.truncate", "os.access", "os.readlink", "os.mkfifo",
    "os.path.exists", "os.path.lexists", "os.path.isfile", "os.path.isdir", "os.path.islink",
    "os.path.realpath", "os.path.getsize", "os.path.getmtime", "glob.glob", "sqlite3.connect",
}
FS_MODULES = ("shutil.",)
FS_METHODS = {
    "read_text", "read_bytes", "write_text", "write_bytes", "mkdir", "unlink", "rmdir",
    "rename", "replace", "touch", "exists", "is_file", "is_dir", "is_symlink", "iterdir",
    "glob", "rglob", "stat", "lstat", "chmod", "lchmod", "open", "symlink_to",
    "hardlink_to", "resolve", "readlink", "owner",
}
# expressions that name an agent's folder or something in it
AGENT_ATTRS = {"work", "group_dir", "inbox", "outbox", "heartbeat", "INBOX", "OUTBOX",
               "HEARTBEAT"}
AGENT_NAMES = {"work", "group_dir", "inbox", "outbox"}
AGENT_STRINGS = {"work", "inbox", "outbox", ".heartbeat", "agent", "container.json.tmp"}
ALLOWED = {"hostile.Folder.open", "Folder.open"}  # the one door


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else node.attr
    return ""


def names_agent_path(node: ast.AST) -> bool:
    for n in ast.walk(node):
        if isinstance(n, ast.Attribute) and n.attr in AGENT_ATTRS:
            return True
        if isinstance(n, ast.Name) and n.id in AGENT_NAMES:
            return True
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in AGENT_STRINGS:
            return True
    return False


def folder_names(tree: ast.AST) -> set[str]:
    """Names bound to a hostile Folder (`with hostile.Folder.open(...) as work:`,
    `with paths.work_folder() as w:`): calls on them are the door itself."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                call = item.context_expr
                if isinstance(call, ast.Call) and isinstance(item.optional_vars, ast.Name) \
                        and (dotted(call.func) in ALLOWED
                             or dotted(call.func).endswith((".work_folder", ".sub"))):
                    out.add(item.optional_vars.id)
    return out


def findings(source: str, filename: str = "<snippet>") -> list[str]:
    out = []
    tree = ast.parse(source, filename)
    folders = folder_names(tree)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        if name in ALLOWED:
            continue
        args = [*node.args, *(k.value for k in node.keywords)]
        if name in FS_FUNCS or name.startswith(FS_MODULES):
            hit = any(names_agent_path(a) for a in args)
        elif isinstance(node.func, ast.Attribute) and node.func.attr in FS_METHODS:
            if isinstance(node.func.value, ast.Name) and node.func.value.id in folders:
                continue
            hit = names_agent_path(node.func.value) or any(names_agent_path(a) for a in args)
        else:
            continue
        if hit:
            out.append(f"{filename}:{node.lineno}: {ast.unparse(node)[:120]}")
    return out


def test_no_host_code_touches_an_agent_folder_by_path():
    assert len(HOST_CODE) > 30  # the walk sees the whole host
    bad = [f for p in HOST_CODE for f in findings(p.read_text(), str(p.relative_to(ROOT)))]
    assert bad == [], "\n".join(["use nanoclaw/hostile.py for these:", *bad])


def test_the_walk_catches_path_based_calls():
    caught = [
        "os.unlink(os.path.join(paths.work, '.heartbeat'))",
        "Path(paths.work).joinpath('x').write_text('y')",
        "open(settings.group_dir('main') / 'CLAUDE.md', 'w')",
        "shutil.copyfile(src, os.path.join(tpaths.work, 'inbox', name))",
        "(spec.group_dir / 'container.json.tmp').write_text(data)",
        "os.stat(os.path.join(root, 'work', sessiondb.HEARTBEAT)).st_mtime",
        "os.walk(group_dir)",
        "sqlite3.connect(os.path.join(paths.work, 'x.db'))",
        "os.chown(os.path.join(top, 'outbox', n), uid, gid)",
    ]
    for line in caught:
        assert findings(line), line
    fine = [
        "hostile.Folder.open(paths.work, create=True)",
        "with paths.work_folder() as work:\n    work.stat('.heartbeat')",
        "os.makedirs(paths.db, exist_ok=True)",
        "open(paths.config + '.tmp', 'w')",
        "work.copy_to(rel, dst, name)",
    ]
    for line in fine:
        assert not findings(line), line
    # and a real module with one such line added fails the walk
    src = (ROOT / "nanoclaw" / "lifecycle" / "sweep.py").read_text()
    assert findings(src) == []
    assert findings(src + "\n\ndef peek(paths):\n    return os.stat(paths.work + '/x')\n")
