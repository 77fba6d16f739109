"""Start Debian's Orthanc (with its DICOMweb plugin) on 127.0.0.1 for the tests and benchmarks:
free port, storage in a given folder, one registered user, no DICOM port; stopped on exit."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

ORTHANC = shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc",) if Path(p).is_file()), None)
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing() -> str | None:
    """Why Orthanc cannot be started here (None: it can)."""
    if ORTHANC is None:
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)"
    if not PLUGIN.is_file():
        return f"Orthanc's DICOMweb plugin is missing ({PLUGIN}; apt-get install orthanc-dicomweb)"
    return None


@contextmanager
def running_orthanc(root: Path, user: str, password: str, timeout: float = 30.0) -> Iterator[SimpleNamespace]:
    """``.url`` (the DICOMweb root), ``.base``, ``.rest(path)`` (GET JSON), ``.upload(bytes)`` (a file
    through the REST API, which takes files STOW-RS refuses), ``.client`` (dicomweb-client)."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "Name": "kneeosteo-test",
        "StorageDirectory": str(root / "db"),
        "IndexDirectory": str(root / "db"),
        "HttpPort": port,
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {user: password},
        "Plugins": [str(PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "HttpDescribeErrors": True,
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    base = f"http://127.0.0.1:{port}"
    session = requests.Session()
    session.auth = (user, password)
    with open(root / "orthanc.log", "w") as log:
        proc = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT, cwd=root)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    if session.get(f"{base}/dicom-web/studies", timeout=2).status_code == 200:
                        break
                except requests.exceptions.ConnectionError:
                    pass
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"Orthanc exited ({proc.returncode}): {(root / 'orthanc.log').read_text()[-2000:]}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Orthanc did not answer within {timeout:g} s")
                time.sleep(0.1)
            yield SimpleNamespace(
                url=f"{base}/dicom-web",
                base=base,
                root=root,
                port=port,
                proc=proc,
                rest=lambda path: session.get(base + path, timeout=10).json(),
                upload=lambda data: session.post(base + "/instances", data=data, timeout=30).json(),
                client=DICOMwebClient(f"{base}/dicom-web", session=session),
            )
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
