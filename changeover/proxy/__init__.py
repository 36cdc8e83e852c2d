"""The data plane: the embedded proxy and HAProxy, behind one seam (`control.ProxyControl`)."""
