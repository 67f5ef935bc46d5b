"""``falco-gitlab demo``: the whole pipeline on one machine, fed with sample GitLab events.

Starts the project's local Kafka broker, one ingest worker, one enrich worker (with MaxMind's test City
database when present) and the rule evaluation: real Falco with the plugin when a ``falco`` binary is
available, else the replay evaluator following the enriched topic. Then it sends the sample payloads
the way GitLab does (raw JSON labelled form-urlencoded, token header) and prints the alerts as they
arrive. It keeps running until Ctrl-C (or ``falco-gitlab demo --stop`` from another terminal), or,
with ``--once``, stops everything after the sample alerts are in.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DESTINATION = "demo-gitlab"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--once", action="store_true",
        help="stop everything and exit once the sample alerts are shown (CI, scripts)")
    parser.add_argument(
        "--stop", action="store_true",
        help="stop what a previous demo left running (e.g. after a crash) and exit")
    parser.add_argument("--port", type=int, default=0, help="ingest listen port (default: a free port)")
    parser.add_argument("--work-dir", type=Path, default=PROJECT_ROOT / ".run" / "demo",
                        help="where the demo keeps its broker data, configs and logs (default .run/demo)")
    parser.add_argument(
        "--samples", type=Path, action="append",
        help="file or directory of GitLab JSON payloads (default: samples/gitlab and samples/scenarios)")
    parser.add_argument(
        "--falco", metavar="PATH",
        help="falco binary (default: $FALCO_BIN or falco on PATH; else the replay evaluator)")
    parser.add_argument(
        "--no-falco", action="store_true", help="use the replay evaluator even if Falco exists")
    parser.add_argument("--timeout", type=float, default=180.0,
                        help="seconds to wait for the pipeline and the alerts (default 180)")


def run(args: argparse.Namespace) -> int:
    from falco_gitlab.logs import setup_logging

    setup_logging("warning")
    demo = Demo(args)
    if args.stop:
        demo.stop_leftovers()
        return 0
    try:
        return demo.run()
    except KeyboardInterrupt:
        return 0
    except DemoError as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        demo.shutdown()


class DemoError(Exception):
    pass


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(args.work_dir).resolve()
        self.logs = self.work / "logs"
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.broker: Any = None
        self.deadline = time.monotonic() + args.timeout

    # --- lifecycle ------------------------------------------------------------------------------

    def run(self) -> int:
        from falco_gitlab.devkafka import LocalKafka

        self.stop_leftovers(quiet=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        signal.signal(signal.SIGTERM, _raise_interrupt)

        say("Starting the local Apache Kafka broker (first run fetches its jars from Maven Central)...")
        self.broker = LocalKafka(self.work / "kafka", die_with_parent=True)
        bootstrap: str = self.broker.start()
        self._create_topics(bootstrap)
        say(f"  kafka     {bootstrap}  (topics gitlab.audit.raw, gitlab.audit.enriched, gitlab.audit.dlq)")

        token = self._write_token()
        port = self.args.port or _free_port()
        ingest_config = self._write_ingest_config(bootstrap, port)
        self._spawn("ingest", ["ingest", "-c", str(ingest_config)])
        url = f"http://127.0.0.1:{port}/"
        self._wait_ready(f"http://127.0.0.1:{port}/readyz", "ingest")
        say(f"  ingest    {url}  (destination {DESTINATION!r}, token in {self.work / 'token'})")

        enrich_cmd = ["enrich", "--bootstrap-servers", bootstrap, "--group-id", "demo-enrich"]
        city_db = PROJECT_ROOT / "tests" / "data" / "geoip" / "GeoIP2-City-Test.mmdb"
        if city_db.exists():
            enrich_cmd += ["--city-db", str(city_db)]
        self._spawn("enrich", enrich_cmd)
        say(f"  enrich    group demo-enrich{' with ' + city_db.name if city_db.exists() else ''}")

        alerts_out = self._start_rules(bootstrap)

        samples = load_samples(self.args.samples)
        say(f"\nSending {len(samples)} GitLab audit events the way GitLab does...")
        statuses = send_samples(url, token, samples)
        summary = ", ".join(f"{n} x HTTP {code}" for code, n in sorted(statuses.items()))
        say(f"  {summary}\n\nAlerts:")
        accepted = sum(n for code, n in statuses.items() if 200 <= code < 300)
        if accepted != len(samples):
            raise DemoError(f"ingest accepted {accepted} of {len(samples)} events; see {self.logs}")

        shown = self._show_alerts(alerts_out, quiet_after=6.0, stop_when_quiet=self.args.once)
        if self.args.once:
            say(f"\n{shown} alerts from {len(samples)} events. Stopping.")
            return 0 if shown > 0 else 1
        return 0

    def _start_rules(self, bootstrap: str) -> IO[bytes]:
        rules = PROJECT_ROOT / "rules" / "gitlab.yaml"
        falco = None if self.args.no_falco else (self.args.falco or os.environ.get("FALCO_BIN")
                                                 or shutil.which("falco"))
        if falco:
            library = self.work / "libgitlabkafka.so"
            build = [sys.executable, "-m", "falco_gitlab", "plugin", "build", "--output", str(library)]
            subprocess.run(build, check=True, stdout=subprocess.DEVNULL)
            config = self.work / "falco.yaml"
            config.write_text(_falco_yaml(library, bootstrap, rules), encoding="utf-8")
            proc = self._spawn("falco", [falco, "-c", str(config), "--disable-source", "syscall"],
                               python=False, stdout=subprocess.PIPE)
            say(f"  falco     {falco} with the gitlabkafka plugin, rules {rules.relative_to(PROJECT_ROOT)}")
        else:
            proc = self._spawn("replay", ["replay", "--rules", str(rules), "--bootstrap-servers", bootstrap,
                                          "--topic", "gitlab.audit.enriched", "--follow", "--from-beginning",
                                          "--group-id", "demo-replay"], stdout=subprocess.PIPE)
            say(f"  rules     replay evaluator following gitlab.audit.enriched "
                f"(no falco binary found), rules {rules.relative_to(PROJECT_ROOT)}")
        assert proc.stdout is not None
        return proc.stdout

    def _show_alerts(self, stream: IO[bytes], quiet_after: float, stop_when_quiet: bool) -> int:
        """Print alerts as they come. In --once mode, return after a quiet spell following the first."""
        import selectors

        import msgspec

        selector = selectors.DefaultSelector()
        selector.register(stream, selectors.EVENT_READ)
        shown = 0
        last = time.monotonic()
        if not stop_when_quiet:
            say_running_banner(self)
        buffer = b""
        while True:
            if stop_when_quiet and ((shown and time.monotonic() - last > quiet_after)
                                    or time.monotonic() > self.deadline):
                return shown
            self._check_children()
            if not selector.select(timeout=0.5):
                continue
            chunk = os.read(stream.fileno(), 65536)
            if not chunk:
                raise DemoError(f"the rule evaluator stopped; see {self.logs}")
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if not line.startswith(b"{"):
                    continue  # Falco's own start-up and summary text
                alert = msgspec.json.decode(line)
                shown += 1
                last = time.monotonic()
                say(f"  {alert.get('priority', '?'):<13} {alert.get('rule', '?')}\n"
                    f"                {_strip_time(alert.get('output', ''))}")

    def shutdown(self) -> None:
        if self.children or self.broker is not None:
            say("\nStopping the demo (rules, enrich, ingest, Kafka)...")
        for name, proc in reversed(list(self.children.items())):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    print(f"{name} did not stop in 15 s; killing it", file=sys.stderr)
                    proc.kill()
                    proc.wait()
        self.children.clear()
        if self.broker is not None:
            self.broker.stop(purge=True)
            self.broker = None
        pid_file = self.work / "pids"
        pid_file.unlink(missing_ok=True)

    def stop_leftovers(self, quiet: bool = False) -> None:
        """Stop processes and the broker that an earlier demo run left behind."""
        from falco_gitlab.devkafka import LocalKafka

        stopped = 0
        pid_file = self.work / "pids"
        if pid_file.exists():
            for line in pid_file.read_text().split():
                try:
                    os.kill(int(line), signal.SIGTERM)
                    stopped += 1
                except (ProcessLookupError, ValueError):
                    pass
            pid_file.unlink()
        if (self.work / "kafka").exists():
            broker = LocalKafka(self.work / "kafka")
            if broker.is_running():
                stopped += 1
            broker.stop(purge=True)
        if not quiet:
            say(f"stopped {stopped} leftover demo process(es)" if stopped
                else "nothing of the demo was running")

    # --- helpers --------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], python: bool = True,
               stdout: int | None = None) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "falco_gitlab", *argv] if python else argv
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - owned by the child for its life
        proc = subprocess.Popen(command, stdout=stdout if stdout is not None else log, stderr=log,
                                stdin=subprocess.DEVNULL, cwd=PROJECT_ROOT)
        self.children[name] = proc
        with open(self.work / "pids", "a", encoding="ascii") as pids:
            pids.write(f"{proc.pid}\n")
        return proc

    def _check_children(self) -> None:
        for name, proc in self.children.items():
            if proc.poll() is not None:
                log = self.logs / f"{name}.log"
                raise DemoError(
                    f"{name} exited with status {proc.returncode}; last lines of {log}:\n{_tail(log)}")

    def _wait_ready(self, url: str, name: str) -> None:
        import urllib.error
        import urllib.request

        while time.monotonic() < self.deadline:
            self._check_children()
            try:
                with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback only
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.3)
        raise DemoError(f"{name} did not become ready in time; see {self.logs / (name + '.log')}")

    def _write_token(self) -> str:
        import secrets

        token = secrets.token_urlsafe(18)  # 24 characters, like a newer GitLab destination token
        path = self.work / "token"
        path.write_text(token + "\n", encoding="ascii")
        path.chmod(0o600)
        return token

    def _write_ingest_config(self, bootstrap: str, port: int) -> Path:
        path = self.work / "ingest.toml"
        path.write_text(
            "# Written by falco-gitlab demo.\n"
            f'[server]\nhost = "127.0.0.1"\nport = {port}\n\n'
            f'[kafka]\nbootstrap_servers = "{bootstrap}"\n\n'
            f'[spool]\ndir = "{self.work / "spool"}"\n\n'
            f'[[destinations]]\nname = "{DESTINATION}"\ntoken_files = ["{self.work / "token"}"]\n',
            encoding="utf-8",
        )
        return path

    @staticmethod
    def _create_topics(bootstrap: str) -> None:
        from confluent_kafka.admin import AdminClient
        from confluent_kafka.cimpl import NewTopic

        admin = AdminClient({"bootstrap.servers": bootstrap})
        wanted = [NewTopic("gitlab.audit.raw", 3, 1), NewTopic("gitlab.audit.enriched", 3, 1),
                  NewTopic("gitlab.audit.dlq", 1, 1)]
        for topic, future in admin.create_topics(wanted, operation_timeout=30).items():
            try:
                future.result()
            except Exception as exc:  # an existing topic is fine; anything else is not
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise DemoError(f"cannot create topic {topic}: {exc}") from exc


def load_samples(paths: list[Path] | None) -> list[bytes]:
    """Sample payloads: the GitLab captures plus scenario events that exercise the GeoIP rules."""
    sources = paths or [PROJECT_ROOT / "samples" / "gitlab", PROJECT_ROOT / "samples" / "scenarios"]
    payloads: list[bytes] = []
    for source in sources:
        files = sorted(source.glob("*.json")) if source.is_dir() else [source]
        payloads.extend(f.read_bytes().strip() for f in files)
    if not payloads:
        raise DemoError(f"no sample payloads found in {', '.join(map(str, sources))}")
    return payloads


def send_samples(url: str, token: str, payloads: list[bytes]) -> dict[int, int]:
    """POST each payload as GitLab does: raw JSON body labelled form-urlencoded, token header."""
    import http.client
    from urllib.parse import urlsplit

    import msgspec

    target = urlsplit(url)
    statuses: dict[int, int] = {}
    connection = http.client.HTTPConnection(target.hostname or "127.0.0.1", target.port, timeout=10)
    try:
        for body in payloads:
            event_type = msgspec.json.decode(body).get("event_type", "")
            connection.request("POST", target.path or "/", body=body, headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "X-Gitlab-Event-Streaming-Token": token,
                "X-Gitlab-Audit-Event-Type": event_type,
            })
            response = connection.getresponse()
            response.read()
            statuses[response.status] = statuses.get(response.status, 0) + 1
    finally:
        connection.close()
    return statuses


def say_running_banner(demo: Demo) -> None:
    token_file = demo.work / "token"
    port = demo.args.port
    config = (demo.work / "ingest.toml").read_text(encoding="utf-8")
    for line in config.splitlines():
        if line.startswith("port ="):
            port = int(line.split("=")[1])
    say("\nThe pipeline keeps running; alerts appear below as events arrive. Send your own event:\n"
        f"  curl -H \"X-Gitlab-Event-Streaming-Token: $(cat {token_file})\" "
        f"--data-binary @samples/gitlab/user_impersonation.json http://127.0.0.1:{port}/\n"
        f"Logs: {demo.logs}.  Stop: Ctrl-C here, or `make stop` / `falco-gitlab demo --stop`.\n")


def say(text: str) -> None:
    print(text, flush=True)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _strip_time(output: str) -> str:
    # Falco prefixes the output with the event time and priority, both already shown.
    parts = output.split(" ", 2)
    return parts[2] if len(parts) == 3 and parts[0].endswith(":") else output


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _falco_yaml(library: Path, bootstrap: str, rules: Path) -> str:
    return (
        "# Written by falco-gitlab demo: plugin-only Falco reading the enriched topic live.\n"
        "engine:\n  kind: nodriver\n"
        "json_output: true\n"
        "stdout_output:\n  enabled: true\n"
        f"rules_files:\n  - {rules}\n"
        "load_plugins: [gitlabkafka]\n"
        "plugins:\n"
        "  - name: gitlabkafka\n"
        f"    library_path: {library}\n"
        "    init_config:\n"
        f'      brokers: "{bootstrap}"\n'
        "      topic: gitlab.audit.enriched\n"
        "      group_id: demo-falco\n"
        '    open_params: "live:earliest"\n'
    )
