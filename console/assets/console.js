// Progressive enhancement only: every page works without it.
document.addEventListener("change", (event) => {
  // "Try it": a chosen file of sample events fills the text area.
  const input = event.target;
  if (input.matches("input[type=file][data-fills]")) {
    const file = input.files && input.files[0];
    const target = document.getElementById(input.dataset.fills);
    if (file && target) file.text().then((text) => { target.value = text; });
  }
});
