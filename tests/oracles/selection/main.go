// Oracle for tests/unit/test_selection.py: the kube-scheduler's own nodeaffinity.GetRequiredNodeAffinity(pod).Match(node).
// Reads one JSON object a line, {"storage": <spec.storage>, "node": <Node>}, prints MATCH, NOMATCH, ERROR (no term
// matched and a term did not parse) or BADJSON. Built by the test inside a copy of e2e/controlplane/go.mod, which
// already requires k8s.io/api and k8s.io/component-helpers.

package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"

	v1 "k8s.io/api/core/v1"
	"k8s.io/component-helpers/scheduling/corev1/nodeaffinity"
)

type storage struct {
	NodeSelector map[string]string `json:"nodeSelector"`
	NodeAffinity *v1.NodeAffinity  `json:"nodeAffinity"`
}

type input struct {
	Storage storage `json:"storage"`
	Node    v1.Node `json:"node"`
}

func main() {
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<24)
	for in.Scan() {
		var x input
		if err := json.Unmarshal(in.Bytes(), &x); err != nil {
			fmt.Println("BADJSON")
			continue
		}
		pod := &v1.Pod{Spec: v1.PodSpec{NodeSelector: x.Storage.NodeSelector}}
		if x.Storage.NodeAffinity != nil {
			pod.Spec.Affinity = &v1.Affinity{NodeAffinity: x.Storage.NodeAffinity}
		}
		ok, err := nodeaffinity.GetRequiredNodeAffinity(pod).Match(&x.Node)
		switch {
		case ok:
			fmt.Println("MATCH")
		case err != nil:
			fmt.Println("ERROR")
		default:
			fmt.Println("NOMATCH")
		}
	}
}
