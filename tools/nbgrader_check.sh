#!/usr/bin/env bash
# Real-client check of the generated nbgrader notebooks: a throwaway venv with nbgrader 0.9.6 (never the
# book's environment: its dependencies could disturb the pinned toolchain), a course directory with one
# assignment built by tools/make_assignments.py --with-solutions, then
#   nbgrader generate_assignment  (release version: solutions stripped, checksums recorded)
#   nbgrader autograde            (on a solution-filled submission: every check must earn its point).
# Exits non-zero when any step fails or the autograded score is not full marks.
#
# Environment: BOOK_PYTHON  python with relgrad and the book's packages (default: .venv/bin/python, else python3)
#              NBGRADER_VENV reuse this venv (default: a fresh one under a temporary folder)
#              CHAPTER       chapter to grade (default: biases)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BOOK_PYTHON=${BOOK_PYTHON:-$( [ -x .venv/bin/python ] && echo "$ROOT/.venv/bin/python" || command -v python3 )}
CHAPTER=${CHAPTER:-biases}
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
VENV=${NBGRADER_VENV:-$WORK/venv}
T0=$(date +%s)

if [ ! -x "$VENV/bin/nbgrader" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check nbgrader==0.9.6 2>&1 | grep -v "^WARNING: Location" || true
fi
export PATH="$VENV/bin:$PATH"   # nbgrader runs `alembic` from PATH
"$VENV/bin/nbgrader" --version
echo "install: $(( $(date +%s) - T0 ))s"

# The kernel `python3` that nbgrader starts is the book's python (relgrad, numpy, torch), not the nbgrader venv's.
export JUPYTER_PATH=$WORK/kernels/share/jupyter JUPYTER_DATA_DIR=$WORK/data JUPYTER_CONFIG_DIR=$WORK/config
"$BOOK_PYTHON" -m ipykernel install --prefix "$WORK/kernels" --name python3 --display-name "Python 3 (book)" >/dev/null

COURSE=$WORK/course; mkdir -p "$COURSE/source/ps1"
cat > "$COURSE/nbgrader_config.py" <<CFG
c = get_config()
c.CourseDirectory.course_id = "relgrad"
c.CourseDirectory.root = "$COURSE"
c.ExecutePreprocessor.timeout = 300
CFG
"$BOOK_PYTHON" tools/make_assignments.py "book/$CHAPTER.md" --with-solutions --out "$COURSE/source/ps1"

cd "$COURSE"
T1=$(date +%s)
"$VENV/bin/nbgrader" db assignment add ps1
"$VENV/bin/nbgrader" db student add s1
"$VENV/bin/nbgrader" db student add s2
"$VENV/bin/nbgrader" generate_assignment ps1 --force
test -f "release/ps1/$CHAPTER.ipynb"
! grep -q "BEGIN SOLUTION" "release/ps1/$CHAPTER.ipynb"
echo "generate_assignment: $(( $(date +%s) - T1 ))s"

mkdir -p submitted/s1/ps1
cp "source/ps1/$CHAPTER.ipynb" submitted/s1/ps1/      # a submission with the reference solutions filled in
mkdir -p submitted/s2/ps1
cp "release/ps1/$CHAPTER.ipynb" submitted/s2/ps1/     # the untouched student version: must score 0
T2=$(date +%s)
"$VENV/bin/nbgrader" autograde ps1 --force
echo "autograde: $(( $(date +%s) - T2 ))s"
"$VENV/bin/python" - <<'PY'
from nbgrader.api import Gradebook
with Gradebook("sqlite:///gradebook.db") as gb:
    sub = gb.find_submission("ps1", "s1")
    print(f"autograded score, reference solutions: {sub.score} / {sub.max_score}")
    assert sub.max_score > 0 and sub.score == sub.max_score, "a check failed on the reference solutions"
    blank = gb.find_submission("ps1", "s2")
    print(f"autograded score, untouched student notebook: {blank.score} / {blank.max_score}")
    assert blank.score == 0, "an unanswered exercise earned points"
PY
echo "nbgrader check passed in $(( $(date +%s) - T0 ))s"
