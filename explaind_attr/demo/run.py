"""placeholder, being written"""
from dataclasses import dataclass
@dataclass
class DemoConfig: pass
@dataclass
class DemoSummary: pass
def run_demo(out_dir, *, quick=False, progress=True):
    raise NotImplementedError("the demo is being written")
