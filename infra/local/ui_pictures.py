"""Pictures of what a data engineer sees in the Prefect UI, for the README.

Starts a Prefect server (SQLite, in a temporary folder), ingests a release and answers a few
questions against it, then takes headless Chromium screenshots of the ingest run page, its
summary artifact and the answer run page. Needs Debian's `chromium`.
Run: .venv/bin/python infra/local/ui_pictures.py --release ../shared/data/releases/milvus_docs_faq_2.4.x_en.zip
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))


def start_server(home: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_HOME": str(home / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "true", "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
            return server
        except OSError:
            time.sleep(1)
    raise RuntimeError("the Prefect server did not start")


def screenshot(url: str, target: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        raise SystemExit("install Debian's chromium first: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--no-first-run", "--disable-background-networking", "--disable-component-update",
                        "--disable-sync", f"--user-data-dir={profile}", "--window-size=1440,1100",
                        "--virtual-time-budget=20000", f"--screenshot={target}", url],
                       check=True, capture_output=True, timeout=120)


async def latest_runs(api: str) -> dict:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.sorting import FlowRunSort

    async with PrefectClient(api) as client:
        runs = await client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC)
        flows = {f.id: f.name for f in await client.read_flows()}
        artifacts = await client.read_artifacts()
    found = {}
    for run in runs:
        found.setdefault(flows.get(run.flow_id), run.id)
    summary = next((a.id for a in artifacts if (a.key or "").endswith("-ingest-summary")), None)
    return {"ingest": found.get("ingest-docs"), "answer": found.get("answer-questions"), "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--release", default=str(ROOT.parent / "shared/data/releases/milvus_docs_faq_2.4.x_en.zip"))
    parser.add_argument("--out", default=str(ROOT / "docs"))
    parser.add_argument("--port", type=int, default=4321)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="docsrag-ui-"))
    server = start_server(home, args.port)
    api = f"http://127.0.0.1:{args.port}/api"
    env = {**os.environ, "PREFECT_API_URL": api, "DOCSRAG_HOME": str(home / "docsrag"), "HF_HUB_OFFLINE": "1"}
    from docsrag.testing.llm_emulator import Emulator

    emulator = Emulator(max_num_seqs=16, step_s=(0.002, 0.004), output_tokens=40).start()
    try:
        docsrag = str(BIN / "docsrag")
        subprocess.run([docsrag, "ingest", "--release", args.release], env=env, check=True, capture_output=True)
        for question in ("Where does Milvus store data?", "Is Docker the only way to install Milvus?",
                         "How do I bake sourdough bread?"):
            subprocess.run([docsrag, "ask", question], env=env, check=True, capture_output=True)
        subprocess.run([docsrag, "answer"], env={**env, "DOCSRAG_LLM_BASE_URL": emulator.url}, check=True,
                       capture_output=True)
        ids = asyncio.run(latest_runs(api))
        ui = f"http://127.0.0.1:{args.port}"
        screenshot(f"{ui}/runs/flow-run/{ids['ingest']}", out / "ingest-run.png")
        screenshot(f"{ui}/artifacts/artifact/{ids['summary']}", out / "ingest-summary.png")
        screenshot(f"{ui}/runs/flow-run/{ids['answer']}", out / "answer-run.png")
        print(f"pictures in {out}: ingest-run.png, ingest-summary.png, answer-run.png")
    finally:
        emulator.stop()
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
