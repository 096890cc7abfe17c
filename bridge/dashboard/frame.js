// One redraw per animation frame for everything that asked for it.
// Background tabs get no animation frames, so a timer stands in there.

const pending = new Set();
let scheduled = false;
let timer = 0;

function run() {
  clearTimeout(timer);
  timer = 0;
  if (!scheduled) return;
  scheduled = false;
  const fns = [...pending];
  pending.clear();
  for (const fn of fns) {
    try {
      fn();
    } catch (err) {
      console.error(err);
    }
  }
}

/** Calls fn once before the next frame, however often it is scheduled. */
export function schedule(fn) {
  pending.add(fn);
  if (scheduled) return;
  scheduled = true;
  requestAnimationFrame(run);
  if (!timer) timer = setTimeout(run, 250);
}
