#!/usr/bin/env python3
"""Checks for the deployment files (README "Deploy"), run by scripts/deploy_check.sh.

    deploy_check.py runtime            # the Dockerfile's runtime stage as JSON
    deploy_check.py names BOTMETRICS   # every name the files use exists

`names` fails (exit 1, one line per problem) when Dockerfile, compose.yaml,
deploy/nginx.conf, deploy/botmetrics.service or deploy/botmetrics.env name a
flag or a BOTMETRICS_* variable that `BOTMETRICS --help` does not list, a
file that is not in the repository, a service, volume or database that is not
defined, or when the ports and paths that must agree (listen, EXPOSE,
HEALTHCHECK, nginx upstreams, volume, data dir, SQLite path) do not.
Needs PyYAML (scripts/deploy_check.sh installs it into a virtualenv).
"""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent

# Flags of other tools that the files' comments mention (cargo, docker,
# systemctl, redis-server); anything else spelled --like-this must be a botmetrics flag.
FOREIGN_FLAGS = {"--locked", "--path", "--root", "--profile", "--now", "--release", "--name", "--maxmemory-policy", "--appendonly"}
# Environment variables the images themselves document (postgres image).
IMAGE_ENV = {"postgres": {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"}}

problems = []


def problem(msg):
    problems.append(msg)


def dockerfile_stages(text):
    """Instructions per stage: (stage name, [(INSTRUCTION, rest)]), continuation lines joined."""
    logical, cur = [], ""
    for line in text.splitlines():
        if not cur and (line.lstrip().startswith("#") or not line.strip()):
            continue
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        logical.append(cur + line)
        cur = ""
    stages = []
    for line in logical:
        instr, _, rest = line.strip().partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            words = rest.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else words[0]
            stages.append((name, words[0], []))
        elif stages:
            stages[-1][2].append((instr, rest.strip()))
    return stages


def runtime_stage():
    stages = dockerfile_stages((ROOT / "Dockerfile").read_text())
    name, base, instrs = stages[-1]
    out = {"stage": name, "base": base, "env": {}, "copy": [], "run": []}
    for instr, rest in instrs:
        if instr == "ENV":
            for pair in shlex.split(rest):
                k, _, v = pair.partition("=")
                out["env"][k] = v
        elif instr in ("ENTRYPOINT", "CMD", "VOLUME"):
            out[instr.lower()] = json.loads(rest)
        elif instr in ("USER", "WORKDIR", "EXPOSE", "STOPSIGNAL"):
            out[instr.lower()] = rest
        elif instr == "HEALTHCHECK":
            opts, _, cmd = rest.partition(" CMD ")
            out["healthcheck"] = json.loads(cmd)
            out["healthcheck_options"] = opts.split()
        elif instr == "COPY":
            out["copy"].append(rest.split())
        elif instr == "RUN":
            out["run"].append(rest)
    out["builder_run"] = [r for i, r in stages[0][2] if i == "RUN"]
    return out


def help_names(binary):
    text = subprocess.run([binary, "--help"], capture_output=True, text=True, check=True).stdout
    flags = set(re.findall(r"^\s+(?:-\w, )?(--[a-z][a-z0-9-]*)", text, re.M))
    envs = set(re.findall(r"\[env: (BOTMETRICS_[A-Z0-9_]+)", text))
    return flags, envs


def check_names(binary):
    import yaml  # only here: `runtime` runs before the virtualenv exists

    flags, envs = help_names(binary)
    if len(flags) < 20 or len(envs) < 20:
        problem(f"{binary} --help lists only {len(flags)} flags, {len(envs)} variables")
    files = {
        "Dockerfile": ROOT / "Dockerfile",
        "compose.yaml": ROOT / "compose.yaml",
        "deploy/nginx.conf": ROOT / "deploy/nginx.conf",
        "deploy/botmetrics.service": ROOT / "deploy/botmetrics.service",
        "deploy/botmetrics.env": ROOT / "deploy/botmetrics.env",
    }
    for label, path in files.items():
        text = path.read_text()
        for var in sorted(set(re.findall(r"\bBOTMETRICS_[A-Z0-9_]+", text))):
            if var not in envs:
                problem(f"{label}: {var} is not a variable of botmetrics --help")
        for flag in sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", text))):
            if flag not in flags and flag not in FOREIGN_FLAGS and label != "Dockerfile":
                problem(f"{label}: {flag} is not a flag of botmetrics --help")

    rt = runtime_stage()
    # Dockerfile: the paths and the port must agree with each other.
    for flag in [a for a in rt["entrypoint"][1:] + rt["cmd"] if a.startswith("--")]:
        if flag.split("=")[0] not in flags:
            problem(f"Dockerfile: ENTRYPOINT/CMD flag {flag} is not in botmetrics --help")
    for var in rt["env"]:
        if var.startswith("BOTMETRICS_") and var not in envs:
            problem(f"Dockerfile: ENV {var} is not a variable of botmetrics --help")
    copied = {c[-1]: c[-2] for c in rt["copy"] if c[0] == "--from=builder"}
    if rt["entrypoint"][0] not in copied:
        problem(f"Dockerfile: ENTRYPOINT {rt['entrypoint'][0]} is not what COPY --from=builder puts in place")
    elif not any(copied[rt["entrypoint"][0]] in r for r in rt["builder_run"]):
        problem(f"Dockerfile: the builder stage does not produce {copied[rt['entrypoint'][0]]}")
    if not any("cargo build --release --locked" in r for r in rt["builder_run"]):
        problem("Dockerfile: the builder does not run `cargo build --release --locked`")
    port = rt["env"]["BOTMETRICS_LISTEN"].rsplit(":", 1)[1]
    if rt.get("expose") != port:
        problem(f"Dockerfile: EXPOSE {rt.get('expose')} but BOTMETRICS_LISTEN port {port}")
    if f"127.0.0.1:{port}/healthz" not in " ".join(rt["healthcheck"]):
        problem(f"Dockerfile: HEALTHCHECK {rt['healthcheck']} does not probe /healthz on port {port}")
    data_dir = rt["env"]["BOTMETRICS_DATA_DIR"]
    db = rt["env"]["BOTMETRICS_DATABASE_URL"]
    if rt["volume"] != [data_dir] or rt["workdir"] != data_dir:
        problem(f"Dockerfile: VOLUME {rt['volume']} / WORKDIR {rt['workdir']} are not the data dir {data_dir}")
    if not db.startswith(f"sqlite://{data_dir}/"):
        problem(f"Dockerfile: the SQLite file {db} is not on the volume {data_dir}")
    uid = rt["user"].split(":")[0]
    if not any(f"--uid {uid}" in r and f"-o botmetrics -g botmetrics {data_dir}" in r for r in rt["run"]):
        problem(f"Dockerfile: USER {rt['user']} is not the user created owning {data_dir}")

    # compose.yaml
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    volumes = set(compose.get("volumes") or {})
    databases = {"botmetrics"}  # POSTGRES_DB, checked below
    init_sql = (ROOT / "deploy/postgres-init.sql").read_text()
    databases |= set(re.findall(r"create database (\w+)", init_sql))
    for name, svc in services.items():
        image = svc.get("image", "")
        if "build" in svc:
            ctx = ROOT / (svc["build"] if isinstance(svc["build"], str) else svc["build"]["context"])
            if not (ctx / "Dockerfile").is_file():
                problem(f"compose {name}: build context {ctx} has no Dockerfile")
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("./"):
                if not (ROOT / src).exists():
                    problem(f"compose {name}: {src} does not exist")
            elif src not in volumes:
                problem(f"compose {name}: volume {src} is not declared")
        for dep in svc.get("depends_on", []):
            if dep not in services:
                problem(f"compose {name}: depends on {dep}, no such service")
        env = svc.get("environment") or {}
        base = image.split(":")[0]
        for key in env:
            if key.startswith("BOTMETRICS_"):
                continue  # checked against --help above
            if key not in IMAGE_ENV.get(base, set()):
                problem(f"compose {name}: {key} is not a variable {image} reads")
        if base == "postgres" and env.get("POSTGRES_DB") != "botmetrics":
            problem(f"compose {name}: POSTGRES_DB is not botmetrics")
        if image == "botmetrics:local":
            for vol in svc.get("volumes", []):
                if vol.split(":")[1] != data_dir:
                    problem(f"compose {name}: volume {vol} is not on the image's data dir {data_dir}")
            for key in ("BOTMETRICS_DATABASE_URL", "BOTMETRICS_REDIS_URL"):
                if key in env:
                    url = urlsplit(env[key].replace("${POSTGRES_PASSWORD:-change-me}", "x"))
                    if url.hostname not in services:
                        problem(f"compose {name}: {key} host {url.hostname} is not a service")
                    if key.endswith("DATABASE_URL") and url.path.lstrip("/") not in databases:
                        problem(f"compose {name}: database {url.path} is neither POSTGRES_DB nor created by deploy/postgres-init.sql")
            for p in svc.get("ports", []):
                if not p.endswith(f":{port}"):
                    problem(f"compose {name}: port {p} does not reach the image's {port}")

    # deploy/nginx.conf: upstreams are compose replicas on the image's port.
    nginx = (ROOT / "deploy/nginx.conf").read_text()
    upstreams = re.findall(r"^\s*server\s+([\w.-]+):(\d+);", nginx, re.M)
    if len(upstreams) != 3:
        problem(f"deploy/nginx.conf: {len(upstreams)} upstream servers, not 3")
    for host, p in upstreams:
        svc = services.get(host, {})
        if svc.get("image") != "botmetrics:local" or "BOTMETRICS_REDIS_URL" not in (svc.get("environment") or {}):
            problem(f"deploy/nginx.conf: upstream {host} is not a cluster replica in compose.yaml")
        if p != port:
            problem(f"deploy/nginx.conf: upstream {host}:{p} but botmetrics listens on {port}")
    listen = re.search(r"^\s*listen\s+(\d+);", nginx, re.M)
    nginx_ports = services.get("nginx", {}).get("ports", [])
    if not listen or not any(p.endswith(f":{listen.group(1)}") for p in nginx_ports):
        problem(f"deploy/nginx.conf: listen {listen and listen.group(1)} is not published by compose ({nginx_ports})")

    # deploy/botmetrics.service: the state directory is the data dir.
    unit = (ROOT / "deploy/botmetrics.service").read_text()
    state = re.search(r"^StateDirectory=(\S+)", unit, re.M)
    unit_env = dict(re.findall(r"^Environment=(\w+)=(\S+)", unit, re.M))
    if not state or unit_env.get("BOTMETRICS_DATA_DIR") != f"/var/lib/{state.group(1)}":
        problem("deploy/botmetrics.service: BOTMETRICS_DATA_DIR is not the StateDirectory")
    if not unit_env.get("BOTMETRICS_DATABASE_URL", "").startswith(f"sqlite://{unit_env.get('BOTMETRICS_DATA_DIR')}/"):
        problem("deploy/botmetrics.service: the SQLite file is not in the StateDirectory")
    for arg in shlex.split(re.search(r"^ExecStart=(.*)$", unit, re.M).group(1))[1:]:
        if arg.startswith("--") and arg.split("=")[0] not in flags:
            problem(f"deploy/botmetrics.service: ExecStart flag {arg} is not in botmetrics --help")


def main():
    if sys.argv[1:2] == ["runtime"]:
        print(json.dumps(runtime_stage()))
        return 0
    if sys.argv[1:2] == ["names"] and len(sys.argv) == 3:
        check_names(sys.argv[2])
        for p in problems:
            print(f"deploy_check: {p}", file=sys.stderr)
        if not problems:
            print("deploy_check: every flag, variable, file, service, volume, database and port named exists and agrees")
        return 1 if problems else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
