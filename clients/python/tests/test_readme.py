"""The Python commands of the READMEs, run as written (from the repository
root, with this virtualenv's python and pip as an activated virtualenv
would give), so that a command that stops working fails here.

Commands are the lines of ```sh blocks in clients/python/README.md and in
the main README's "Bot integration" section that start with python,
python3, pip or an environment assignment. Three substitutions: the
simulator runs against a test server ($BOTMETRICS_URL, which it reads) for
3 s instead of the written duration, a history (--days) with 100 users
instead of the written number, and the benchmark gets --quick. A command
this test does not know fails it, so a new command comes with its check.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import unittest
from typing import List

from helpers import BOT, CLIENT_DIR, REPO, TOKEN, Server

# Not run, and why.
NOT_RUN = {
    "clients/python/ci.sh": "it is what runs this test",
    "example_aiogram_bot.py": "it talks to Telegram",
}


def readme_commands() -> List[str]:
    with open(os.path.join(CLIENT_DIR, "README.md"), encoding="utf-8") as f:
        texts = [f.read()]
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        main = f.read()
    section = re.search(r"^## Bot integration\n(.*?)(?=^## )", main, re.S | re.M)
    assert section, "README.md has no 'Bot integration' section"
    texts.append(section.group(1))
    commands = []
    for text in texts:
        for block in re.findall(r"```sh\n(.*?)```", text, re.S):
            for line in block.splitlines():
                line = line.split("  #")[0].strip()
                if re.match(r"^(python3?|pip|[A-Z_]+=\S*) ", line):
                    commands.append(line)
    return commands


class ReadmeCommandsTest(unittest.TestCase):
    def test_every_python_command_of_the_readmes_runs(self) -> None:
        commands = readme_commands()
        self.assertIn("pip install ./clients/python", commands)
        self.assertTrue(any("botmetrics.simulate" in c for c in commands), commands)
        server = Server.for_test(self)
        for line in commands:
            with self.subTest(command=line):
                self.run_command(line, server)

    def run_command(self, line: str, server: Server) -> None:
        if any(marker in line for marker in NOT_RUN):
            return
        env = dict(os.environ, BOTMETRICS_URL=server.url)
        words = shlex.split(line)
        while words and re.match(r"^[A-Z_]+=", words[0]):
            name, value = words.pop(0).split("=", 1)
            env[name] = value
        program, args = words[0], words[1:]
        if program in ("python", "python3"):
            argv = [sys.executable, *args]
        elif program == "pip":
            argv = [sys.executable, "-m", "pip", "install", "-q", *args[1:]] if args[:1] == ["install"] \
                else [sys.executable, "-m", "pip", *args]
        else:
            self.fail(f"unknown command in a README: {line}")
        if "botmetrics.simulate" in line or "simulate.py" in line:
            self.run_simulator(argv, env, server)
        elif "benchmarks/hot_path.py" in line:
            out = self.run_ok(argv + ["--quick"], env)
            self.assertIn("botmetrics helpers / prometheus_client Counter:", out)
        elif argv[1:3] == ["-m", "pip"]:
            self.run_ok(argv, env)
        else:
            self.fail(f"no check for this README command: {line}")

    def run_simulator(self, argv: List[str], env: dict, server: Server) -> None:
        before = server.value("botmetrics_events_accepted_total", bot=BOT)
        i = argv.index("--users" if "--days" in argv else "--duration")
        argv = argv[:i + 1] + ["100" if "--days" in argv else "3"] + argv[i + 2:]
        self.assertEqual(argv[argv.index("--token") + 1], TOKEN, "the README's token is the server's")
        out = self.run_ok(argv + ["--seed", "5", "--quiet"], env)
        sent = int(re.search(r"events sent=(\d+) ", out).group(1))
        self.assertGreater(sent, 0, out)
        self.assertIn("rejected=0 dropped=0 unsent=0", out)
        self.assertEqual(server.value("botmetrics_events_accepted_total", bot=BOT) - before, sent)

    def run_ok(self, argv: List[str], env: dict) -> str:
        out = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
        self.assertEqual(out.returncode, 0, f"{argv} failed:\n{out.stdout}\n{out.stderr}")
        return out.stdout


if __name__ == "__main__":
    unittest.main()
