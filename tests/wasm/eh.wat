;; A JSON-interface module (memory64) for the exception-handling tests.
;;
;; handle answers {"ok":true,"response":{"Output":{"data":"caught N"}}} with N
;; what $probe returns. As written here $probe returns 0. The tests replace its
;; body (the last function of the module) with legacy exception handling
;; (try / throw $e 1 / catch $e: the caught 1), which the WAT parser does not
;; accept any more, so that a module that loads and answers "caught 1" proves
;; the legacy code was translated and runs.
(module
  (tag $e (param i32))
  (memory (export "memory") i64 4)
  (data (i64.const 0x08) "\00\00\01\00\00\00\00\00")  ;; heap top: 0x10000
  (data (i64.const 0x100) "{\"ok\":true,\"response\":{\"Output\":{\"data\":\"caught 0\"}}}\00")

  (func $malloc (export "malloc") (param $n i64) (result i64)
    (local $p i64)
    (local.set $p (i64.load (i64.const 0x08)))
    (i64.store (i64.const 0x08)
      (i64.and (i64.add (i64.add (local.get $p) (local.get $n)) (i64.const 7)) (i64.const -8)))
    (local.get $p))

  (func (export "handle") (param $msg i64) (param $env i64) (result i64)
    (i32.store8 (i64.const 0x130) (i32.add (i32.const 48) (call $probe)))
    (i64.const 0x100))

  (func $probe (result i32)
    (i32.const 0))
)
