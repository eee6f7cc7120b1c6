"""Write and read one 7B-shaped activation stream (128 x 376 x 3584 bf16) 7 times; medians."""
import time, torch, os, statistics
from pipeline.data.store import ActivationStore
torch.manual_seed(0)
rows = [torch.randn(376, 3584).to(torch.bfloat16) for _ in range(128)]
root = "/dev/shm/storeab"; os.system(f"rm -rf {root}")
st = ActivationStore(root)
ws, rs = [], []
for k in range(7):
    t=time.perf_counter()
    with st.writer(k) as w:
        for i, r in enumerate(rows): w.append(i, r)
    ws.append(time.perf_counter()-t)
    t=time.perf_counter()
    for chunk in st.iter_layer(k): pass
    rs.append(time.perf_counter()-t)
    st.delete(k)
print(f"write median {statistics.median(ws):.3f}s  read median {statistics.median(rs):.3f}s  writes {[round(x,2) for x in ws]}")
