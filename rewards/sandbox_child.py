"""The sandbox's child bootstrap: runs inside the sandbox, before the user code.

Never imported: `rewards.sandbox` reads this file's source and runs it with ``python -I -B -c``
(so it only uses the standard library). argv: cpu_s, memory bytes, file size bytes, open files,
processes (0 = bounded by a cgroup instead), audit hook (0/1), uid to drop to (0 = stay), the
input dir ("-" = none) and the script. In order: drop to nobody when the host runs us as root,
copy the inputs into the work dir (the cwd), set the rlimits, install the audit hook, run
the script as ``__main__``.
"""

import os
import resource
import runpy
import shutil
import sys

cpu, mem, fsize, nofile, nproc, audit, drop = (int(a) for a in sys.argv[1:8])
inputs, script = sys.argv[8:10]
if drop:  # host root: become nobody (no capabilities left; bwrap set no_new_privs)
    os.setgroups([])
    os.setgid(drop)
    os.setuid(drop)
if inputs != "-":
    for name in os.listdir(inputs):
        shutil.copyfile(os.path.join(inputs, name), name)
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
if nproc:
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
if audit:
    root = os.getcwd() + os.sep
    denied = frozenset(
        (
            "socket.__new__",
            "socket.connect",
            "socket.bind",
            "socket.sendto",
            "socket.sendmsg",
            "socket.getaddrinfo",
            "socket.gethostbyname",
            "socket.gethostbyaddr",
            "subprocess.Popen",
            "os.system",
            "os.exec",
            "os.posix_spawn",
            "os.spawn",
            "os.fork",
            "os.forkpty",
            "pty.spawn",
            "os.kill",
            "os.killpg",
            "os.symlink",
            "os.link",
        )
    )
    paths = {
        "os.remove": (0,),
        "os.rmdir": (0,),
        "os.rename": (0, 1),
        "os.mkdir": (0,),
        "os.chmod": (0,),
        "os.chown": (0,),
        "os.truncate": (0,),
        "os.utime": (0,),
        "shutil.rmtree": (0,),
    }
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def inside(path):
        if isinstance(path, int):
            return True
        path = os.path.normpath(os.path.join(root, os.fsdecode(path)))
        return (path + os.sep).startswith(root)

    def hook(event, args):
        if event in denied:
            raise PermissionError(f"sandbox: {event} is not allowed (no network, no processes)")
        if event == "open":
            path, mode, flags = args
            writes = (mode is not None and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags
            )
            if path is not None and writes and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the sandbox dir")
        elif event in paths:
            for i in paths[event]:
                if i < len(args) and args[i] is not None and not inside(args[i]):
                    raise PermissionError(f"sandbox: {event} on {args[i]!r} outside the dir")

    sys.addaudithook(hook)
sys.argv = [script]
sys.path.insert(0, os.getcwd())  # like `python main.py`: the script's dir is importable
runpy.run_path(script, run_name="__main__")
