# meshrun job 0123abcdwxyz: runs on every node of the cluster under meshrun's host agent
MR_PY='/opt/py 3/bin/python3'
MR_JOB=0123abcdwxyz
MR_RANK="${SKYPILOT_NODE_RANK:-0}"
MR_DIR="$HOME/.meshrun/jobs/$MR_JOB/rank$MR_RANK"
mkdir -p "$MR_DIR" || exit 97
printf '%s' 'QUJD' | "$MR_PY" -c 'import base64,io,json,os,sys,tarfile
d=sys.argv[1]
t=tarfile.open(fileobj=io.BytesIO(base64.b64decode(sys.stdin.read())),mode="r:gz")
kw={"filter":"data"} if hasattr(tarfile,"data_filter") else {}
t.extractall(d,**kw)
p=os.path.join(d,"launch.json")
l=json.load(open(p))
l["cwd"]=os.getcwd()
open(p,"w").write(json.dumps(l))
' "$MR_DIR" || { echo "meshrun: cannot unpack the job with $MR_PY" >&2; exit 97; }
if [ "$MR_RANK" = 0 ]; then echo "::meshrun-started:$MR_JOB::"; fi
if ! "$MR_PY" -c 'import sys, cloudpickle; sys.exit(cloudpickle.__version__ != "3.1.3")' 2>/dev/null; then
  export PYTHONPATH="$MR_DIR/.meshrun-lib${PYTHONPATH:+:$PYTHONPATH}"
fi
"$MR_PY" "$MR_DIR/_agent.py" run "$MR_DIR" </dev/null &
MR_PID=$!
trap 'kill -TERM "$MR_PID" 2>/dev/null' TERM INT HUP
tail -n +1 -s 0.2 -F --pid="$MR_PID" "$MR_DIR/$( [ "$MR_RANK" = 0 ] && echo output.log || echo output.rank$MR_RANK.log )" 2>/dev/null &
MR_TAIL=$!
wait "$MR_PID"; MR_RC=$?
while kill -0 "$MR_PID" 2>/dev/null; do wait "$MR_PID"; MR_RC=$?; done
wait "$MR_TAIL" 2>/dev/null
if [ "$MR_RANK" = 0 ]; then
  "$MR_PY" -c 'import base64,gzip,json,os,sys
d,job=sys.argv[1],sys.argv[2]
out={}
for n in ("exit.json","state.json","result.pkl","error.json","error.pkl"):
    p=os.path.join(d,n)
    if os.path.exists(p):
        out[n]=base64.b64encode(open(p,"rb").read()).decode()
b=base64.b64encode(gzip.compress(json.dumps(out).encode())).decode()
c=4000
n=max(1,(len(b)+c-1)//c)
for i in range(n):
    sys.stdout.write("::meshrun-result:%s:%d/%d:%s::\n"%(job,i+1,n,b[i*c:(i+1)*c]))
sys.stdout.flush()
' "$MR_DIR" "$MR_JOB"
fi
exit "$MR_RC"
