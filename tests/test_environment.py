from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def requirement_pins() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def conda_pip_pins() -> list[str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    pins = []
    for line in lines[start + 1 :]:
        if not line.startswith("      - "):
            break
        pins.append(line.strip()[2:])
    return pins


def test_every_requirement_is_pinned():
    pins = requirement_pins()
    assert pins and all("==" in pin for pin in pins)
    names = [pin.split("==")[0] for pin in pins]
    for needed in ("torch", "torchvision", "nvidia-dali-cuda120", "ffcv", "numpy", "click"):
        assert needed in names


def test_environment_yml_carries_the_same_pins():
    assert conda_pip_pins() == requirement_pins()
