# The Mesh sample is accepted and becomes Ready; the status writer reports the generation.
apply_mesh
wait_for --for condition=Ready mesh/default
wait_for --for condition=Accepted mesh/default
generation="$(kc get mesh default -o jsonpath='{.metadata.generation}')"
observed="$(kc get mesh default -o jsonpath='{.status.observedGeneration}')"
[ "$generation" = "$observed" ] || { echo "observedGeneration $observed != generation $generation" >&2; exit 1; }
