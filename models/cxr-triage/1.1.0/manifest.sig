ŽwQDƒ•Ù“>¦bíØDßÇdçXsäcü<—Z
“xª¡A”$Q+ô¸W4U‚	_å£S"xRsUç³w