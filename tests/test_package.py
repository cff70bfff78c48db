import subprocess
import sys


def test_the_plain_pytorch_core_does_not_import_lightning():
    code = (
        "import sys, lightning_sphere\n"
        "assert not {'pytorch_lightning', 'lightning'} & set(sys.modules)\n"
        "assert lightning_sphere.SphereMonitor.__module__ == 'lightning_sphere.pytorch_lightning'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
