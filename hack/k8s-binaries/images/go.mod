// The dev node's own tiny images' programs: pause (the pod sandbox) and testbox (a
// test server and client). Standard library only, built static.
module kubetune.local/k8s-binaries/images

go 1.26.0
