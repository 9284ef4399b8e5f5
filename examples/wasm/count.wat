;; Outputs the number of input bytes in decimal: "hello" -> "5" (valid JSON, so the
;; result's content type is application/json).
;;
;;   dispatch job submit --wasm examples/wasm/count.wat --input hello --wait
(module
  (import "env" "input_len" (func $input_len (result i32)))
  (import "env" "output_write" (func $output_write (param i32 i32)))
  (memory (export "memory") 1)

  (func (export "run") (result i32)
    (local $n i32)
    (local $p i32)
    (local.set $n (call $input_len))
    ;; Write the digits backwards, ending at offset 16 (an i32 has at most 10).
    (local.set $p (i32.const 16))
    (loop $digit
      (local.set $p (i32.sub (local.get $p) (i32.const 1)))
      (i32.store8 (local.get $p)
                  (i32.add (i32.const 48) (i32.rem_u (local.get $n) (i32.const 10))))
      (local.set $n (i32.div_u (local.get $n) (i32.const 10)))
      (br_if $digit (local.get $n)))
    (call $output_write (local.get $p) (i32.sub (i32.const 16) (local.get $p)))
    (i32.const 0)))
