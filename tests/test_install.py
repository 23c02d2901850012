"""tools/install_detectron2.py refuses a wheel whose hash is wrong, before installing anything."""
import subprocess
import sys

from tests.common import REPO


def _pip_freeze():
    return subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True,
                          check=True).stdout


def test_wrong_wheel_is_refused_and_nothing_changes(tmp_path):
    fake = tmp_path / "sal_detectron2-0.7.2-cp310-none-any.whl"
    fake.write_bytes(b"not the wheel we expect")
    before = _pip_freeze()
    result = subprocess.run(
        [sys.executable, f"{REPO}/tools/install_detectron2.py", "--force", "--wheel", str(fake)],
        capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561" in result.stderr
    assert "Nothing was installed" in result.stderr
    assert _pip_freeze() == before


def test_existing_detectron2_is_kept():
    result = subprocess.run([sys.executable, f"{REPO}/tools/install_detectron2.py"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "already installed" in result.stdout
