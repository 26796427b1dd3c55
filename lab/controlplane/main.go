// Command kube-lab runs one component of the lab's control plane: the real etcd,
// kube-apiserver, kube-controller-manager and kube-scheduler of the Kubernetes release pinned in
// lab/pins.env, and kubectl of the same release, linked into one binary so that their shared
// packages compile once. Each component still runs as its own process with its upstream
// command line: `kube-lab <component> [flags]`, or through a link named after the component
// (`kubectl get nodes`).
package main

import (
	"fmt"
	"os"
	"path/filepath"

	_ "time/tzdata" // as kube-apiserver and kube-controller-manager: CronJob time zones

	"go.etcd.io/etcd/server/v3/etcdmain"
	_ "k8s.io/client-go/plugin/pkg/client/auth" // as kubectl: client auth plugins
	"k8s.io/component-base/cli"
	"k8s.io/component-base/logs"
	_ "k8s.io/component-base/logs/json/register"          // JSON log format, as upstream mains
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go metrics, as upstream mains
	_ "k8s.io/component-base/metrics/prometheus/version"  // version metric, as upstream mains
	kubectl "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
)

const usage = "usage: kube-lab etcd|kube-apiserver|kube-controller-manager|kube-scheduler|kubectl [flags]"

func main() {
	component, args := filepath.Base(os.Args[0]), os.Args[1:]
	if component == "kube-lab" {
		if len(os.Args) < 2 {
			fmt.Fprintln(os.Stderr, usage)
			os.Exit(2)
		}
		component, args = os.Args[1], os.Args[2:]
	}
	switch component {
	case "etcd":
		// etcdmain.Main reads its flags from the slice it is given, program name first.
		etcdmain.Main(append([]string{"etcd"}, args...))
	case "kube-apiserver":
		command := apiserver.NewAPIServerCommand()
		command.SetArgs(args)
		os.Exit(cli.Run(command))
	case "kube-controller-manager":
		command := controllermanager.NewControllerManagerCommand()
		command.SetArgs(args)
		os.Exit(cli.Run(command))
	case "kube-scheduler":
		command := scheduler.NewSchedulerCommand()
		command.SetArgs(args)
		os.Exit(cli.Run(command))
	case "kubectl":
		// kubectl reads os.Args itself (plugins, verbosity): give it its own command line.
		os.Args = append([]string{"kubectl"}, args...)
		logs.GlogSetter(kubectl.GetLogVerbosity(os.Args)) // nolint:errcheck
		command := kubectl.NewDefaultKubectlCommand()
		if err := cli.RunNoErrOutput(command); err != nil {
			kubectlutil.CheckErr(err)
		}
	default:
		fmt.Fprintf(os.Stderr, "kube-lab: unknown component %q\n%s\n", component, usage)
		os.Exit(2)
	}
}
